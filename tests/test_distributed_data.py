"""Two real processes (DDP on gloo, CPU) through the isa4d CLI: disjoint training streams, disjoint and complete
validation, the same buckets per step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_two_ranks_train_on_disjoint_data_split_validation_and_share_bucket_schedule(tmp_path):
    from data_prep.synthetic_shards import write_shards

    shards = tmp_path / "shards"
    write_shards(shards, shards=3, per_shard=5, seed=11, sizes=((64, 64), (64, 80)), frames=(20, 30))
    rec = tmp_path / "rec"
    rec.mkdir()
    buckets = json.dumps([{"height": 48, "width": 48, "num_frames": 9, "batch_size": 2},
                          {"height": 32, "width": 40, "num_frames": 5, "batch_size": 3}])
    cmd = [
        sys.executable, "-m", "isa4d.cli", "fit",
        "-c", str(ROOT / "tests/configs/probe.yaml"), "-c", str(ROOT / "configs/data/toy.yaml"),
        "-c", str(ROOT / "configs/trainer/cpu_debug.yaml"),
        f"--data.init_args.train_urls={shards}/markers-*.tar", f"--data.init_args.val_urls={shards}/markers-*.tar",
        f"--data.init_args.buckets={buckets}", "--data.init_args.num_workers=2", "--data.init_args.aspect_tolerance=0.3",
        f"--model.init_args.record_dir={rec}",
        "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.max_steps=8", "--trainer.val_check_interval=8",
        "--trainer.limit_val_batches=null", f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}/runs",
    ]
    path = [str(ROOT), str(ROOT / "src"), str(ROOT / "tests"), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    r0, r1 = (json.loads((rec / f"rank{r}.json").read_text()) for r in (0, 1))
    # the same bucket (and so the same shapes) on both ranks at every step, and the schedule does mix buckets
    assert [s[1:] for s in r0["train"]] == [s[1:] for s in r1["train"]]
    assert len({s[1] for s in r0["train"]}) == 2
    # training: each rank resamples from its own shards (3 shards dealt round-robin), so no clip on both
    train0, train1 = set(r0["train_keys"]), set(r1["train_keys"])
    assert len(r0["train_keys"]) >= 8 and len(r1["train_keys"]) >= 8
    assert not train0 & train1, train0 & train1
    # validation: every clip exactly once across the two ranks
    keys0, keys1 = set(r0["val_keys"]), set(r1["val_keys"])
    assert not keys0 & keys1
    assert len(r0["val_keys"]) + len(r1["val_keys"]) == 15 and len(keys0 | keys1) == 15
