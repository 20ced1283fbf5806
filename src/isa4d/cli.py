"""The `isa4d` command: LightningCLI for both training stages, plus `isa4d data ...` tools.

    isa4d fit -c configs/vae/tiny.yaml [-c more.yaml] [--key value ...]
    isa4d data inspect 'data/toy/train-{000000..000003}.tar'
    isa4d export runs/vae_tiny/checkpoints/last.ckpt vae.safetensors [--ema] [--submodule vae]
    isa4d test -c configs/dit/tiny.yaml -c configs/data/toy.yaml --ckpt_path CKPT [--metrics_json PATH]
    isa4d sample -c configs/dit/tiny.yaml -c configs/sample/toy.yaml --ckpt_path CKPT [--data.init_args.camera orbit]

`validate` and `test` log their metrics to TensorBoard and write them to a JSON file (`--metrics_json`, by default
`metrics_<subcommand>.json` in the run's log directory).

Configs are YAML with class_path/init_args. `parser_mode="omegaconf+"` resolves `${...}` interpolation after all
`-c` files and overrides are merged, so a later override flows into earlier interpolations; under a subcommand use
relative keys (e.g. `${..data.init_args.buckets}`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time

import lightning as L
from lightning.pytorch.cli import LightningCLI

from isa4d.training.callbacks import LoaderHealthLogger
from isa4d.training.throughput import Throughput

SUBCOMMANDS = ("fit", "validate", "test", "predict")


class ISA4DCLI(LightningCLI):
    """LightningCLI with the project's defaults; models and datamodules come from the config's class_path."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--metrics_json", type=str | None, default=None,
                            help="validate/test: write the metrics here (default: <log_dir>/metrics_<subcommand>.json)")

    def after_validate(self) -> None:
        self._write_metrics("validate")

    def after_test(self) -> None:
        self._write_metrics("test")

    def _write_metrics(self, subcommand: str) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        config = self.config[subcommand]
        path = config.get("metrics_json") or os.path.join(trainer.log_dir or trainer.default_root_dir,
                                                          f"metrics_{subcommand}.json")
        metrics = {k: float(v) for k, v in sorted(trainer.callback_metrics.items())}
        record = {
            "subcommand": subcommand,
            "checkpoint": config.get("ckpt_path"),
            "checkpoint_step": getattr(self.model, "loaded_step", None),
            "model": type(self.model).__name__,
            "world_size": trainer.world_size,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "metrics": {k: (v if math.isfinite(v) else None) for k, v in metrics.items()},  # JSON has no NaN
        }
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(record, f, indent=1)
        print(f"isa4d {subcommand}: {len(metrics)} metrics written to {path}")


def run_cli(args: list[str] | None = None, run: bool = True, save_config: bool = True) -> ISA4DCLI:
    """`save_config`: write the resolved config.yaml into the run's log folder (off for `isa4d sample`)."""
    mode = {"parser_mode": "omegaconf+"}
    return ISA4DCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={**mode, **{c: dict(mode) for c in SUBCOMMANDS}},
        trainer_defaults={"callbacks": [LoaderHealthLogger(), Throughput()]},
        save_config_kwargs={"overwrite": True},
        **({} if save_config else {"save_config_callback": None}),
        args=args,
        run=run,
    )


def _log_to_stderr() -> None:
    """isa4d's own INFO lines (checkpoint save times, resumed data positions) on stderr, once."""
    logger = logging.getLogger("isa4d")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    _log_to_stderr()
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["data"]:
        return _data(args[1:])
    if args[:1] == ["predict"]:  # VAEModule has no predict step; stage 2's prediction is `isa4d sample`
        print("isa4d: no `predict` command: `isa4d sample` writes stage 2's videos (docs/inference.md); "
              "`isa4d validate` / `isa4d test` score either stage", file=sys.stderr)
        return 2
    if args[:1] == ["sample"]:  # `isa4d predict` + the callback that writes the videos (docs/inference.md)
        run_cli(["predict", *args[1:], "--trainer.callbacks+=isa4d.inference.writer.SampleWriter"], save_config=False)
        return 0
    if args[:1] == ["export"]:
        from isa4d.training.export import main as export_main

        return export_main(args[1:])
    run_cli(argv)  # None: LightningCLI reads sys.argv itself
    return 0


def _data(argv: list[str]) -> int:
    if argv[:1] == ["inspect"]:
        from isa4d.data.inspect import main as inspect_main

        return inspect_main(argv[1:])
    print("usage: isa4d data inspect URLS [--decode] [--json PATH]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
