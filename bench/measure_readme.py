"""Re-measure the durations the README quotes and write them to docs/timings.md (which the README links).

    make timings                                     # every step: toy world, demo, train-vae, train-dit, eval, test
    python bench/measure_readme.py --steps demo test  # some of them
    python bench/measure_readme.py --short --out /tmp/timings.md   # checks this script in about a minute

Each step runs its command from the repository root, its output going to runs/timings/<step>.log. The table holds
the wall-clock time, the CPU time of the step's processes (user + system; less sensitive than the wall clock to
other work on a shared machine), the load average before and after, and the exit status. The README quotes only
figures from this file. `--short` runs small stand-ins of the steps that have one (a tiny toy world, one test file)
and never writes docs/timings.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs/timings.md"


@dataclass(frozen=True)
class Step:
    name: str
    what: str
    command: str  # {python}: this interpreter, {scratch}: a temporary folder
    short: str | None = None  # the --short stand-in; None: skipped by --short
    prepare: str | None = None  # run first, untimed (what the step assumes exists)


STEPS = (
    Step("data", "toy world generation (default preset, 360 clips)", "make data DATA={scratch}/toy",
         "{python} -m data_prep.toy_world --out {scratch}/toy --preset tiny --workers 1 --body-dir {scratch}/body"),
    Step("demo", "`make demo` once the toy world exists", "make demo", prepare="make data"),
    Step("train-vae", "`make train-vae` (tiny VAE, cpu trainer)", "make train-vae"),
    Step("train-dit", "`make train-dit` (tiny ISA-DiT, its VAE trained)", "make train-dit"),
    Step("eval", "`make eval` (both tiny stages' last checkpoints)", "make eval"),
    Step("test", "`make test` (the default suite)", "make test",
         "{python} -m pytest -q -p no:cacheprovider tests/test_progress.py -k format_line"),
)


@dataclass
class Result:
    step: Step
    command: str
    wall_s: float
    cpu_s: float
    load_before: float
    load_after: float
    status: int


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_step(step: Step, command: str, log_dir: Path) -> Result:
    """Run one step's command, timing it; its output goes to log_dir/<name>.log."""
    log_dir.mkdir(parents=True, exist_ok=True)
    load_before, cpu_before, start = os.getloadavg()[0], _children_cpu(), time.monotonic()
    with open(log_dir / f"{step.name}.log", "w") as log:
        status = subprocess.run(command, shell=True, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.monotonic() - start
    return Result(step, command, wall, _children_cpu() - cpu_before, load_before, os.getloadavg()[0], status)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f}"


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cell(text: str) -> str:
    """A markdown table cell: one line, pipes escaped."""
    return " ".join(text.split("\n")).replace("|", "\\|")


def render(results: list[Result], invocation: str, logs: str = "runs/timings/") -> str:
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows = "\n".join(
        f"| {r.step.what} | `{_cell(r.command)}` | {_minutes(r.wall_s)} | {_minutes(r.cpu_s)} | "
        f"{r.load_before:.1f} / {r.load_after:.1f} | {'ok' if r.status == 0 else f'failed ({r.status})'} |"
        for r in results)
    return (
        "# Timings\n\n"
        f"Measured by `{invocation}` (bench/measure_readme.py) on {when}, commit {_commit()}, "
        f"{os.cpu_count()} CPU cores ({_cpu_model()}), no GPU used. Logs: {logs}. "
        "The wall clock depends on other work on the machine: the load average (1 min, before / after) says how "
        "busy it was; CPU minutes are the step's own processes.\n\n"
        "| step | command | wall (min) | CPU (min) | load before / after | status |\n"
        "|---|---|---|---|---|---|\n"
        f"{rows}\n"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", nargs="+", choices=[s.name for s in STEPS], help="default: all, in the table's order")
    ap.add_argument("--short", action="store_true", help="small stand-ins, to check the script (never docs/)")
    ap.add_argument("--out", type=Path, help=f"default {DOC.relative_to(ROOT)} (--short: a temporary file)")
    ap.add_argument("--logs", type=Path, default=ROOT / "runs/timings")
    a = ap.parse_args(argv)
    if a.short and a.out is not None and a.out.resolve() == DOC:
        ap.error("--short never writes docs/timings.md")
    steps = [s for s in STEPS if a.steps is None or s.name in a.steps]
    scratch = Path(tempfile.mkdtemp(prefix="isa4d-timings-"))
    results = []
    for step in steps:
        template = step.short if a.short else step.command
        if template is None:
            print(f"{step.name}: no short stand-in, skipped")
            continue
        command = template.format(python=shlex.quote(sys.executable), scratch=scratch)
        if step.prepare and not a.short:
            print(f"{step.name}: first, untimed: {step.prepare}", flush=True)
            if subprocess.run(step.prepare, shell=True, cwd=ROOT).returncode != 0:
                print(f"{step.name}: `{step.prepare}` failed; step skipped")
                continue
        print(f"{step.name}: {command}", flush=True)
        result = run_step(step, command, a.logs)
        print(f"{step.name}: {_minutes(result.wall_s)} min wall, {_minutes(result.cpu_s)} min CPU, "
              f"exit {result.status}", flush=True)
        if a.short:
            result.step = Step(step.name, f"{step.what}: short stand-in", step.command)
        results.append(result)
    out = a.out or (scratch / "timings.md" if a.short else DOC)
    invocation = "python bench/measure_readme.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])
                                                     if (argv if argv is not None else sys.argv[1:]) else "")
    out.parent.mkdir(parents=True, exist_ok=True)
    logs = os.path.relpath(a.logs, ROOT) if a.logs.resolve().is_relative_to(ROOT) else str(a.logs)
    out.write_text(render(results, invocation, logs))
    print(f"wrote {out}")
    return 0 if all(r.status == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
