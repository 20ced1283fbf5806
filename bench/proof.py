"""`make proof`: the recipe that shows isa4d learns, on one GPU machine (docs/proof.md).

Stages, each skipped when its output exists (so the recipe runs as several calls of a few minutes, each continuing
from what the last one left on disk):

1. data    the toy world's `proof` preset (1-2 people framed large, held-out validation identities) -> data/proof
2. vae     stage 1 (configs/vae/proof.yaml) for --vae-steps, then `isa4d test` on the held-out clips
3. dit     the four pose variants (ISA+ISPE, ISA without ISPE, 2D maps, no pose) x --seeds, side by side on the one
           GPU, equal steps and data: configs/dit/proof.yaml + configs/dit/ablation/<variant>.yaml
4. eval    `isa4d test` of every DiT run on the held-out clips (every batch sampled with the ground-truth background
           and reference)
5. report  docs/proof.md, docs/proof.json and a contact sheet per variant (ground truth | sample | body points)

    python bench/proof.py                     # every stage that has not run yet
    python bench/proof.py --stage vae,dit     # some stages
Wall times, the device and the versions go into the state file (runs/proof/state.json) and the report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name -> (overlay, what it is)
    "isa_ispe": ("configs/dit/ablation/isa_ispe.yaml", "ISA + ISPE (the paper's model)"),
    "maps": ("configs/dit/ablation/maps.yaml", "2D normal maps, ISA off (ControlNet-lite)"),
    "isa_no_ispe": ("configs/dit/ablation/isa_no_ispe.yaml", "ISA without ISPE"),
    "no_pose": ("configs/dit/ablation/no_pose.yaml", "no pose condition"),
}
STAGES = ("data", "vae", "dit", "eval", "report")


class Recipe:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root, self.data = Path(args.root), Path(args.data)
        self.state_path = self.root / "state.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {"stages": {}}

    # ------------------------------------------------------------------------------------------------ helpers

    def save_state(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.state_path.write_text(json.dumps(self.state, indent=1))

    def cli(self, *argv: str) -> list[str]:
        return [sys.executable, "-m", "isa4d.cli", *argv, *(f"--{kv}" for kv in self.args.set)]

    def run(self, cmd: list[str], log: Path) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        print("+", " ".join(cmd), flush=True)
        with log.open("w") as f:
            res = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        if res.returncode:
            tail = log.read_text().splitlines()[-15:]
            raise SystemExit(f"proof: command failed ({res.returncode}), log {log}:\n" + "\n".join(tail))

    def run_all(self, jobs: list[tuple[list[str], Path]], parallel: int) -> None:
        """Run commands side by side, at most `parallel` at a time; fail if any fails."""
        pending, running, failed = list(jobs), [], []
        while pending or running:
            while pending and len(running) < parallel:
                cmd, log = pending.pop(0)
                log.parent.mkdir(parents=True, exist_ok=True)
                print("+", " ".join(cmd), flush=True)
                running.append((subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT),
                                log))
            time.sleep(2)
            for proc, log in list(running):
                if proc.poll() is not None:
                    running.remove((proc, log))
                    if proc.returncode:
                        failed.append(log)
        if failed:
            raise SystemExit("proof: failed runs, see " + ", ".join(map(str, failed)))

    def timed(self, name: str, fn) -> None:
        if name in self.state["stages"] and not self.args.force:
            print(f"proof: {name} done earlier ({self.state['stages'][name]['seconds']} s), skipped", flush=True)
            return
        start = time.perf_counter()
        fn()
        self.state["stages"][name] = {"seconds": round(time.perf_counter() - start, 1),
                                      "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.state.setdefault("device", device_name())
        self.save_state()

    def train_args(self, run_dir: Path) -> list[str]:
        return [f"--trainer.default_root_dir={run_dir}", f"--trainer.logger.init_args.save_dir={run_dir}",
                "--trainer.logger.init_args.name=tb", "--trainer.logger.init_args.version=fit",
                "--trainer.callbacks+=isa4d.training.checkpoint.AtomicCheckpoint",
                f"--trainer.callbacks.dirpath={run_dir}/checkpoints", "--trainer.callbacks.save_last=true"]

    def vae_ckpt(self) -> Path:
        return self.root / "vae" / "checkpoints" / "last.ckpt"

    def runs(self) -> list[tuple[str, int, Path]]:
        return [(v, s, self.root / "dit" / f"{v}_s{s}") for v in self.args.variants for s in self.args.seeds]

    # ------------------------------------------------------------------------------------------------- stages

    def stage_data(self) -> None:
        self.run([sys.executable, "-m", "data_prep.toy_world", "--out", str(self.data), "--preset", "proof",
                  "--workers", str(self.args.workers), "--body-dir", self.args.body_dir], self.root / "logs/data.log")

    def stage_vae(self) -> None:
        run_dir = self.root / "vae"
        a = self.args
        self.run(self.cli("fit", "-c", "configs/vae/proof.yaml", "-c", a.data_config, "-c", a.trainer,
                          *self.train_args(run_dir), f"--trainer.max_steps={a.vae_steps}",
                          f"--trainer.val_check_interval={a.vae_val_every}", "--trainer.limit_val_batches=4",
                          f"--data.init_args.train_urls={self.data}/train-*.tar",
                          f"--data.init_args.val_urls={self.data}/val-*.tar"), self.root / "logs/vae_fit.log")
        self.run(self.cli("test", "-c", "configs/vae/proof.yaml", "-c", a.data_config, "-c", a.trainer,
                          f"--ckpt_path={self.vae_ckpt()}", f"--metrics_json={run_dir}/metrics_test.json",
                          f"--trainer.default_root_dir={run_dir}", f"--trainer.logger.init_args.save_dir={run_dir}",
                          "--trainer.logger.init_args.name=tb", "--trainer.logger.init_args.version=test",
                          f"--trainer.limit_test_batches={a.eval_batches}",
                          f"--data.init_args.val_urls={self.data}/val-*.tar"), self.root / "logs/vae_test.log")

    def dit_config(self, variant: str) -> list[str]:
        return ["-c", "configs/dit/proof.yaml", "-c", VARIANTS[variant][0], "-c", self.args.data_config,
                "-c", self.args.trainer, f"--model.init_args.vae_checkpoint={self.vae_ckpt()}",
                f"--model.init_args.body_model_dir={self.args.body_dir}",
                f"--data.init_args.train_urls={self.data}/train-*.tar",
                f"--data.init_args.val_urls={self.data}/val-*.tar", "--data.init_args.num_workers=2"]

    def stage_dit(self) -> None:
        a = self.args
        jobs = [(self.cli("fit", *self.dit_config(v), *self.train_args(run_dir), f"--seed_everything={s}",
                          f"--data.init_args.seed={s}", f"--trainer.max_steps={a.dit_steps}",
                          f"--trainer.val_check_interval={a.dit_val_every}", "--trainer.limit_val_batches=2"),
                 self.root / f"logs/dit_{v}_s{s}.log")
                for v, s, run_dir in self.runs() if not (run_dir / "checkpoints" / "last.ckpt").exists()]
        self.run_all(jobs, a.parallel)

    def stage_eval(self) -> None:
        jobs = [(self.cli("test", *self.dit_config(v), f"--ckpt_path={run_dir}/checkpoints/last.ckpt",
                          f"--metrics_json={run_dir}/metrics_test.json", f"--trainer.default_root_dir={run_dir}",
                          f"--trainer.logger.init_args.save_dir={run_dir}", "--trainer.logger.init_args.name=tb",
                          "--trainer.logger.init_args.version=test",
                          f"--trainer.limit_test_batches={self.args.eval_batches}"),
                 self.root / f"logs/eval_{v}_s{s}.log")
                for v, s, run_dir in self.runs() if not (run_dir / "metrics_test.json").exists()]
        self.run_all(jobs, self.args.parallel)

    def stage_report(self) -> None:
        from proof_report import write_report  # bench/proof_report.py
        write_report(self.root, Path(self.args.docs), self.state, self.runs(), VARIANTS, self.args)

    def main(self) -> None:
        for name in self.args.stage:
            self.timed(name, getattr(self, f"stage_{name}"))


def device_name() -> str:
    try:
        import torch
        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
        return f"CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}"
    except ImportError:  # pragma: no cover
        return "unknown"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", default=",".join(STAGES), help=f"comma-separated, from {STAGES}")
    p.add_argument("--root", default="runs/proof")
    p.add_argument("--data", default="data/proof")
    p.add_argument("--docs", default="docs")
    p.add_argument("--body-dir", default="data/body")
    p.add_argument("--data-config", default="configs/data/proof.yaml")
    p.add_argument("--trainer", default="configs/trainer/single_gpu.yaml")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    p.add_argument("--vae-steps", type=int, default=3000)
    p.add_argument("--vae-val-every", type=int, default=250)
    p.add_argument("--dit-steps", type=int, default=2000)
    p.add_argument("--dit-val-every", type=int, default=500)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--parallel", type=int, default=8, help="runs side by side on the one GPU")
    p.add_argument("--eval-batches", default="1.0", help="isa4d test's limit_test_batches (1.0: every batch)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for every isa4d run (e.g. a smaller bucket for a CPU smoke run)")
    p.add_argument("--force", action="store_true", help="rerun stages recorded as done")
    args = p.parse_args(argv)
    args.stage = [s for s in args.stage.split(",") if s]
    unknown = sorted(set(args.stage) - set(STAGES)) + sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        p.error(f"unknown stage or variant: {unknown}")
    args.variants = args.variants.split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    return args


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    Recipe(parse_args()).main()
