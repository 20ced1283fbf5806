"""Fault trials through the real `isa4d fit` on the CPU (the tiny VAE, 1 process with configs/trainer/cpu.yaml or
2 FSDP processes with cpu_fsdp.yaml, each with the callbacks `make train-vae` adds): a signal to the process group
or to one rank, or kill -9 of the group while checkpoints are written every step; then a resume with
`--ckpt_path last`. Each trial is classified:

    resumed      the run saved (or, for kill -9, had saved) a step and the resume restored it and trained on
    from scratch the resume found no checkpoint
    corrupt load the resume failed to load the checkpoint
    hang         the run did not exit within the timeout after a signal
    silent exit  the run exited 0 after a signal (a job script would read it as done), or with a status other than
                 Preemption's 75

    python tests/fault_suite.py --trials 10 [--cases 1p-TERM-group 2p-TERM-rank1 ...] [--markdown]

tests/test_fault_suite.py runs one trial of each case in the slow tier.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent)]
from resume_helpers import BUCKET, ROOT, env  # noqa: E402

PREEMPTED = 75
CASES = {  # name: (processes, signal, target)
    "1p-TERM-group": (1, signal.SIGTERM, "group"),
    "1p-USR1-group": (1, signal.SIGUSR1, "group"),
    "2p-TERM-group": (2, signal.SIGTERM, "group"),
    "2p-TERM-rank0": (2, signal.SIGTERM, "rank0"),
    "2p-TERM-rank1": (2, signal.SIGTERM, "rank1"),
    "2p-USR1-group": (2, signal.SIGUSR1, "group"),
    "1p-KILL-save": (1, signal.SIGKILL, "group"),
    "2p-KILL-save": (2, signal.SIGKILL, "group"),
}
OUTCOMES = ("resumed", "from scratch", "corrupt load", "hang", "silent exit")


@dataclass
class Trial:
    case: str
    outcome: str
    detail: str


def write_shards(out: Path) -> str:
    from data_prep.synthetic_shards import write_shards as write

    write(out, shards=2, per_shard=4, seed=5, sizes=((64, 64), (64, 80)), frames=(20, 30))
    return f"{out}/markers-*.tar"


def fit_command(run_dir: Path, shards: str, processes: int, *args: str) -> list[str]:
    """The `make train-vae` command line on cpu.yaml or cpu_fsdp.yaml, tiny VAE, 32x32x5 clips, 2 loader workers."""
    trainer = "cpu.yaml" if processes == 1 else "cpu_fsdp.yaml"
    return [sys.executable, "-m", "isa4d.cli", "fit", "-c", str(ROOT / "configs/vae/tiny.yaml"),
            "-c", str(ROOT / "configs/data/toy.yaml"), "-c", str(ROOT / "configs/trainer" / trainer),
            f"--data.init_args.train_urls={shards}", f"--data.init_args.val_urls={shards}",
            f"--data.init_args.buckets={BUCKET}", "--data.init_args.num_workers=2",
            "--trainer.val_check_interval=4", "--trainer.limit_val_batches=2",
            f"--trainer.default_root_dir={run_dir}", f"--trainer.logger.init_args.save_dir={run_dir}",
            "--trainer.callbacks+=isa4d.training.checkpoint.AtomicCheckpoint",
            f"--trainer.callbacks.dirpath={run_dir}/checkpoints", "--trainer.callbacks.save_last=true", *args]


def dit_fit_command(run_dir: Path, shards: str, vae_checkpoint: Path, body_dir: Path, *args: str) -> list[str]:
    """The `make train-dit` command line on cpu.yaml: the tiny DiT on a frozen tiny VAE, 32x32x5 toy-world clips."""
    return [sys.executable, "-m", "isa4d.cli", "fit", "-c", str(ROOT / "configs/dit/tiny.yaml"),
            "-c", str(ROOT / "configs/data/toy.yaml"), "-c", str(ROOT / "configs/trainer/cpu.yaml"),
            f"--data.init_args.train_urls={shards}", f"--data.init_args.val_urls={shards}",
            f"--data.init_args.buckets={BUCKET}", "--data.init_args.num_workers=2",
            f"--model.init_args.vae_checkpoint={vae_checkpoint}", f"--model.init_args.body_model_dir={body_dir}",
            "--model.init_args.evaluation.init_args.metrics=[psnr,ssim]", "--model.init_args.sample_steps=2",
            "--trainer.val_check_interval=4", "--trainer.limit_val_batches=1",
            f"--trainer.default_root_dir={run_dir}", f"--trainer.logger.init_args.save_dir={run_dir}",
            "--trainer.callbacks+=isa4d.training.checkpoint.AtomicCheckpoint",
            f"--trainer.callbacks.dirpath={run_dir}/checkpoints", "--trainer.callbacks.save_last=true", *args]


def saved_step(last: Path) -> int | None:
    import torch

    if not (last.exists()):
        return None
    meta = last / "meta.pt" if last.is_dir() else last
    return int(torch.load(meta, map_location="cpu", weights_only=True)["global_step"])


def rank_pids(rank0: int) -> dict[str, int]:
    """rank0 and rank1 (the child of rank 0 started with LOCAL_RANK=1; loader workers are forks without it)."""
    pids = {"rank0": rank0}
    children = Path(f"/proc/{rank0}/task/{rank0}/children")
    for pid in (children.read_text().split() if children.exists() else []):
        try:
            if b"LOCAL_RANK=1\0" in Path(f"/proc/{pid}/environ").read_bytes():
                pids["rank1"] = int(pid)
        except OSError:
            pass
    return pids


def trial(case: str, tmp: Path, shards: str, rng: random.Random, timeout: float = 180) -> Trial:
    processes, sig, target = CASES[case]
    run_dir = tmp / "run"
    steps = tmp / "steps"
    extra = ["--trainer.callbacks.every_n_train_steps=1"] if sig == signal.SIGKILL else []
    cmd = fit_command(run_dir, shards, processes, *extra, "--trainer.max_steps=1000",  # extra: the Makefile's callback
                      "--trainer.callbacks+=resume_helpers.StepMarker", f"--trainer.callbacks.path={steps}")
    log = open(tmp / "fit.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp, env=env(), start_new_session=True)
    at = rng.randint(1, 5)
    try:
        end = time.monotonic() + timeout
        while not (steps.exists() and int(steps.read_text() or 0) >= at):
            if proc.poll() is not None or time.monotonic() > end:  # the harness failed, not a trial
                raise RuntimeError(f"{case}: the run ended or stalled before step {at} (rc {proc.poll()}): "
                                   f"{(tmp / 'fit.log').read_text()[-3000:]}")
            time.sleep(0.1)
        if processes == 2:
            while "rank1" not in rank_pids(proc.pid):
                time.sleep(0.1)
        time.sleep(rng.uniform(0, 1.5))  # anywhere in a step: forward, backward, a save, a validation
        seen = int(steps.read_text())
        if target == "group":
            os.killpg(proc.pid, sig)
        else:
            os.kill(rank_pids(proc.pid)[target], sig)
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return Trial(case, "hang", f"no exit {timeout:.0f} s after {sig.name} at step {seen}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        time.sleep(1)  # loader workers and rank 1 leave after rank 0
        log.close()
    last = run_dir / "checkpoints/last.ckpt"
    store = run_dir / "checkpoints/.store"
    mid_save = " (killed mid-save: a .partial was left)" if any(
        p.name.endswith(".partial") for p in (store.iterdir() if store.is_dir() else [])) else ""
    try:
        step = saved_step(last)
    except Exception as e:  # noqa: BLE001 - any failure to read it is a corrupt checkpoint
        return Trial(case, "corrupt load", f"{last}: {type(e).__name__}: {e}")
    if sig != signal.SIGKILL and rc != PREEMPTED:
        return Trial(case, "silent exit", f"rc {rc} after {sig.name} at step {seen}, saved step {step}")
    if step is None:
        return Trial(case, "from scratch", f"rc {rc}: no checkpoint at step {seen}")
    res = subprocess.run(fit_command(run_dir, shards, processes, f"--trainer.max_steps={step + 1}",
                                     "--ckpt_path", "last"), capture_output=True, text=True, cwd=tmp, env=env(),
                         timeout=timeout)
    out = res.stdout + res.stderr
    if res.returncode != 0:
        return Trial(case, "corrupt load", f"resume rc {res.returncode}: {out.strip().splitlines()[-1:]}")
    if "Restoring states from the checkpoint path" not in out or saved_step(last) != step + 1:
        return Trial(case, "from scratch", f"saved step {step}, resumed to {saved_step(last)}")
    return Trial(case, "resumed",
                 f"{sig.name} at step {seen} ({target}): rc {rc}, resumed from step {step}{mid_save}")


def run_trials(cases: list[str], trials: int, seed: int = 0, verbose: bool = True) -> dict[str, list[Trial]]:
    rng = random.Random(seed)
    results: dict[str, list[Trial]] = {c: [] for c in cases}
    with tempfile.TemporaryDirectory(prefix="isa4d_faults_") as tmp:
        shards = write_shards(Path(tmp) / "shards")
        for i in range(trials):
            for case in cases:
                folder = Path(tmp) / f"{case}-{i}"
                folder.mkdir()
                t = trial(case, folder, shards, rng)
                results[case].append(t)
                if verbose:
                    print(f"{case:15s} {i:3d} {t.outcome:13s} {t.detail}", flush=True)
    return results


def read_trials(logs: list[str]) -> dict[str, list[Trial]]:
    """The trials printed by run_trials (`case  i  outcome  detail` lines) in saved outputs."""
    results: dict[str, list[Trial]] = {}
    for log in logs:
        for line in Path(log).read_text().splitlines():
            parts = line.split(maxsplit=2)
            if len(parts) == 3 and parts[0] in CASES and parts[1].isdigit():
                outcome = next((o for o in OUTCOMES if parts[2].startswith(o)), None)
                if outcome is not None:
                    results.setdefault(parts[0], []).append(Trial(parts[0], outcome, parts[2][len(outcome):].strip()))
    return {c: results[c] for c in CASES if c in results}


def table(results: dict[str, list[Trial]]) -> str:
    rows = ["| case | trials | " + " | ".join(OUTCOMES) + " |", "|---|---:|" + "---:|" * len(OUTCOMES)]
    for case, ts in results.items():
        rows.append(f"| {case} | {len(ts)} | " + " | ".join(str(sum(t.outcome == o for t in ts)) for o in OUTCOMES)
                    + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10, help="trials per case")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tabulate", nargs="+", metavar="LOG", help="print the table of the trial lines in these "
                        "saved outputs (several runs, or one stopped early) instead of running trials")
    args = parser.parse_args(argv)
    if args.tabulate:
        print(table(read_trials(args.tabulate)))
        return 0
    results = run_trials(args.cases, args.trials, args.seed)
    print(table(results))
    return 0 if all(t.outcome == "resumed" for ts in results.values() for t in ts) else 1


if __name__ == "__main__":
    sys.exit(main())
