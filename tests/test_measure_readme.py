"""bench/measure_readme.py: the README's durations come from it, so its timing and its table must hold."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from conftest import import_script

ROOT = Path(__file__).resolve().parents[1]


def test_steps_are_timed_and_failures_recorded(tmp_path):
    measure = import_script(ROOT / "bench", "measure_readme")
    sleep = measure.Step("sleep", "a 1.5 s sleep", f"{sys.executable} -c 'import time; time.sleep(1.5)'")
    spin = measure.Step("spin", "1 s of CPU", f"{sys.executable} -c 'import time\nt = time.process_time()\n"
                                             "while time.process_time() - t < 1.0: pass'")
    fail = measure.Step("fail", "a failing step", "exit 3")
    results = [measure.run_step(s, s.command, tmp_path / "logs") for s in (sleep, spin, fail)]
    assert 1.5 <= results[0].wall_s < 30 and results[0].cpu_s < 1.0  # sleeping costs wall time, little CPU
    assert results[1].cpu_s >= 1.0  # the child's CPU time is counted
    assert [r.status for r in results] == [0, 0, 3] and (tmp_path / "logs/fail.log").is_file()
    table = measure.render(results, "python bench/measure_readme.py --x")
    rows = re.findall(r"^\| (.+?) \| `(.+?)` \| ([\d.]+) \| ([\d.]+) \| [\d.]+ / [\d.]+ \| (.+?) \|$", table, re.M)
    assert [(r[0], r[4]) for r in rows] == [("a 1.5 s sleep", "ok"), ("1 s of CPU", "ok"),
                                            ("a failing step", "failed (3)")]
    assert rows[0][2] == f"{results[0].wall_s / 60:.1f}" and "`python bench/measure_readme.py --x`" in table


def test_short_mode_runs_and_never_writes_the_docs(tmp_path):
    measure = import_script(ROOT / "bench", "measure_readme")
    before = measure.DOC.read_text() if measure.DOC.exists() else None
    out = tmp_path / "timings.md"
    assert measure.main(["--short", "--steps", "test", "--out", str(out), "--logs", str(tmp_path / "logs")]) == 0
    row = r"^\| `make test` \(the default suite\): short stand-in \| `.+pytest.+` \| [\d.]+ \| [\d.]+ \| .+ \| ok \|$"
    assert re.search(row, out.read_text(), re.M)
    assert (measure.DOC.read_text() if measure.DOC.exists() else None) == before
