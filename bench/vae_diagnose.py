"""Why does the VAE learn slowly? Controlled experiments on toy-world clips (docs/vae.md, "Diagnosis").

Each variant trains a CausalVideoVAE (or a plain 2D autoencoder of the same widths, as a control) on random
crops of clips decoded once from contract shards, for a fixed number of steps or seconds, with the same seed and
data, and reports on held-out clips (posterior mode):
- PSNR of the reconstruction next to the x8 low-pass baseline (area down x8, bicubic up) of the same frames;
- PSNR per frame position inside a latent window (frame 0; then 4(i-1)+1+k for k = 0..3), which shows a temporal
  misalignment or a last-frame bias as a gap between positions;
- the training loss curve.

    python bench/vae_diagnose.py --urls 'data/toy/train-*.tar' --val-urls 'data/toy/val-*.tar' \
        --variants base,static,lr1e-3 --steps 300 --out runs/vae_diagnose.json

Variants are named settings (VARIANTS below); --set KEY=VALUE overrides model kwargs for every variant.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from einops import rearrange

from isa4d.data.contract import parse_sample
from isa4d.data.shards import expand_urls, iter_samples
from isa4d.data.video import decode_all
from isa4d.metrics.reconstruction import lowpass_baseline, psnr_per_frame
from isa4d.models.vae import CausalVideoVAE
from isa4d.training.augment import structured_motion

TINY = dict(latent_channels=16, base_channels=32, channel_mults=[1, 2, 2, 4], num_res_blocks=1,
            temporal_downsample=[False, True, True], mid_attention=False, norm_groups=8, image_regularizer=False)

# name -> (model overrides, training overrides)
VARIANTS: dict[str, tuple[dict, dict]] = {
    "base": ({}, {}),
    "static": ({}, {"static": True}),  # every clip is its first frame repeated: no motion to code
    "sample": ({}, {"posterior": "sample"}),  # decode a posterior sample (as training does), KL 1e-6 summed
    "kl_mean": ({}, {"posterior": "sample", "kl_reduce": "mean"}),  # the VAEModule's KL before the fix
    "imgreg": ({"image_regularizer": True, "image_decoder_channels": [16, 32]}, {"image_reg": 1.0}),
    "lr3e-4": ({}, {"lr": 3e-4}),
    "lr1e-3": ({}, {"lr": 1e-3}),
    "lr2e-3": ({}, {"lr": 2e-3}),
    "betas0.9": ({}, {"betas": (0.9, 0.99)}),
    "factorized": ({"upsampler": "factorized"}, {}),
    "nomotionaug": ({}, {"motion": 0.0}),
    "motionaug": ({}, {"motion": 0.25}),
    "image2d": ({}, {"frames": 1}),  # train on single frames (an image stage)
}


def load_clips(urls: str, size: int, frames: int, limit: int) -> torch.Tensor:
    """(N, 3, T, size, size) in [-1, 1]: the first `frames` frames of up to `limit` clips, area-resized."""
    clips = []

    def fail(url, exn):
        raise exn

    for raw in iter_samples(expand_urls(urls), fail):
        s = parse_sample(raw)
        video = decode_all(s.video, size=(size, size))[:frames]  # (T, H, W, 3) uint8
        if len(video) < frames:
            continue
        clips.append(torch.from_numpy(video))
        if len(clips) >= limit:
            break
    x = torch.stack(clips).float() / 127.5 - 1  # (N, T, H, W, 3)
    return rearrange(x, "n t h w c -> n c t h w").contiguous()


def batches(train: torch.Tensor, batch: int, frames: int, crop: int, static: bool, gen: torch.Generator):
    n, _, t, h, w = train.shape
    while True:
        idx = torch.randint(n, (batch,), generator=gen)
        t0 = torch.randint(t - frames + 1, (batch,), generator=gen)
        y0 = torch.randint(h - crop + 1, (batch,), generator=gen)
        x0 = torch.randint(w - crop + 1, (batch,), generator=gen)
        out = torch.stack([train[i, :, a:a + frames, b:b + crop, c:c + crop] for i, a, b, c in zip(idx, t0, y0, x0)])
        if static:
            out = out[:, :, :1].expand_as(out).contiguous()
        yield out


def evaluate(vae: CausalVideoVAE, val: torch.Tensor, batch: int = 4) -> dict:
    vae.eval()
    psnrs, bases = [], []
    with torch.no_grad():
        for i in range(0, len(val), batch):
            x = val[i:i + batch].to(next(vae.parameters()).device)
            recon = vae.decode(vae.encode(x).mode()).clamp(-1, 1)
            to_btchw = lambda v: rearrange(v, "b c t h w -> b t c h w")  # noqa: E731
            psnrs.append(psnr_per_frame(to_btchw(recon), to_btchw(x)).cpu())
            bases.append(psnr_per_frame(to_btchw(lowpass_baseline(x, 8)), to_btchw(x)).cpu())
    vae.train()
    p, b = torch.cat(psnrs), torch.cat(bases)  # (N, T)
    f = vae.temporal_factor
    positions = {"frame0": float(p[:, 0].mean())}
    for k in range(f):
        positions[f"pos{k}"] = float(p[:, 1 + k::f].mean())
    return {"psnr": float(p.mean()), "psnr_lowpass": float(b.mean()), "by_position": positions}


def run_variant(name: str, train: torch.Tensor, val: torch.Tensor, args) -> dict:
    model_kw, train_kw = VARIANTS[name]
    kw = {**TINY, **args.model_overrides, **model_kw}
    opt = {"lr": args.lr, "betas": (0.9, 0.95), "posterior": "mode", "kl_reduce": "sum", "image_reg": 0.0,
           "static": False, "motion": 0.0, "frames": args.frames, **train_kw}
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    device = torch.device(args.device)
    vae = CausalVideoVAE(**kw).to(device)
    optim = torch.optim.AdamW(vae.parameters(), lr=opt["lr"], betas=opt["betas"], weight_decay=0.0)
    data = batches(train, args.batch, opt["frames"], args.crop, opt["static"], gen)
    curve, start, step = [], time.perf_counter(), 0
    val_curve = []
    while step < args.steps and time.perf_counter() - start < args.seconds:
        x = next(data).to(device)
        if opt["motion"] > 0:
            x = structured_motion(x, opt["motion"], 0.5, gen)
        warm = min(1.0, (step + 1) / max(args.warmup, 1))
        for g in optim.param_groups:
            g["lr"] = opt["lr"] * warm
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            posterior = vae.encode(x)
            z = posterior.sample() if opt["posterior"] == "sample" else posterior.mode()
            recon = vae.decode(z)
            loss = (recon.float() - x).abs().mean()
            if opt["posterior"] == "sample":
                kl = posterior.kl().mean() if opt["kl_reduce"] == "sum" else posterior.kl_mean().mean()
                loss = loss + 1e-6 * kl
            if opt["image_reg"] > 0:
                frames, index = vae.decode_subframes(z)
                loss = loss + opt["image_reg"] * (frames.float() - x[:, :, index]).abs().mean()
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optim.step()
        step += 1
        if step % max(args.steps // 20, 1) == 0:
            curve.append((step, round(loss.item(), 5)))
        if args.eval_every and step % args.eval_every == 0:
            val_curve.append((step, round(time.perf_counter() - start, 1), round(evaluate(vae, val)["psnr"], 2)))
    seconds = time.perf_counter() - start
    result = {"variant": name, "steps": step, "seconds": round(seconds, 1), "model": kw, "train": {
        k: v for k, v in opt.items()}, "loss_curve": curve, "val_curve": val_curve, **evaluate(vae, val)}
    print(f"{name:12s} steps {step:5d} {seconds:6.0f}s  psnr {result['psnr']:.2f}  lowpass {result['psnr_lowpass']:.2f}"
          f"  by position " + " ".join(f"{k}={v:.2f}" for k, v in result["by_position"].items()), flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--urls", required=True)
    p.add_argument("--val-urls", required=True)
    p.add_argument("--variants", default="base")
    p.add_argument("--size", type=int, default=64, help="clips are area-resized to size x size")
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--clips", type=int, default=64)
    p.add_argument("--val-clips", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seconds", type=float, default=math.inf)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model kwarg (JSON value)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    args.model_overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    train = load_clips(args.urls, args.size, args.frames if args.frames > 1 else 9, args.clips)
    val = load_clips(args.val_urls, args.size, 17, args.val_clips)
    print(f"train {tuple(train.shape)} val {tuple(val.shape)} device {args.device}", flush=True)
    results = [run_variant(v, train, val, args) for v in args.variants.split(",")]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "out"},
                                        "results": results}, indent=1, default=str))


if __name__ == "__main__":
    main()
