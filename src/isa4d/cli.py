"""The `isa4d` command: LightningCLI for both training stages, plus sampling, shard inspection and export.

    isa4d fit -c configs/vae/tiny.yaml -c configs/data/toy.yaml [-c more.yaml] [--key value ...]
    isa4d test -c configs/dit/tiny.yaml -c configs/data/toy.yaml --ckpt_path CKPT [--metrics_json PATH]
    isa4d sample -c configs/dit/tiny.yaml -c configs/sample/toy.yaml --ckpt_path CKPT [--data.init_args.camera orbit]
    isa4d data inspect 'data/toy/train-{000000..000003}.tar'
    isa4d export --ckpt_path runs/vae_tiny/checkpoints/last.ckpt --out vae.safetensors [--ema] [--submodule vae]

`validate` and `test` log their metrics to TensorBoard and write them to a JSON file (`--metrics_json`, by default
`metrics_<subcommand>.json` in the run's log directory).

Configs are YAML with class_path/init_args. `parser_mode="omegaconf+"` resolves `${...}` interpolation after all
`-c` files and overrides are merged, so a later override flows into earlier interpolations; under a subcommand use
relative keys (e.g. `${..data.init_args.buckets}`).

Errors: a bad option, a missing file or a failing run ends in one line, `isa4d: error: <what, naming the option or
path>`, and a non-zero exit (2 for usage errors, 1 otherwise); `--debug` (or ISA4D_DEBUG=1) shows the traceback.
Console: each stage prints one start and one end line and its progress (isa4d.training.summary); the upstream
messages that say nothing about the run are filtered in `quiet_upstream`, the one place that does so.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import logging
import math
import os
import re
import sys
import time
import typing
import warnings
from dataclasses import fields, is_dataclass

import lightning as L
from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningCLI

from isa4d import __version__
from isa4d.training.callbacks import LoaderHealthLogger
from isa4d.training.summary import ConsoleProgressBar, StageSummary
from isa4d.training.throughput import Throughput

SUBCOMMANDS = ("fit", "validate", "test", "predict")

COMMANDS = (  # what `isa4d --help` lists, in this order
    ("fit", "train a stage: isa4d fit -c configs/vae/tiny.yaml -c configs/data/toy.yaml [-c trainer.yaml]"),
    ("validate", "one pass over the validation set; metrics to TensorBoard and metrics_validate.json"),
    ("test", "score a checkpoint on the validation/test data (--ckpt_path); metrics to metrics_test.json"),
    ("sample", "generate videos with a DiT checkpoint and a sample config (docs/inference.md)"),
    ("data inspect", "check shards against the data contract: isa4d data inspect 'data/toy/*.tar'"),
    ("export", "one .safetensors file of a checkpoint's weights: --ckpt_path CKPT --out OUT [--ema]"),
    ("version", "the versions of isa4d, torch and lightning (also --version)"),
)
SAMPLE_DESCRIPTION = ("Generate videos with a DiT checkpoint: the sample config names the people, reference image "
                      "and camera path; the videos go to --data.init_args.output_dir (docs/inference.md).")

# Upstream messages filtered by `quiet_upstream`, each with why it says nothing about an isa4d run. Nothing else is
# filtered: other warnings, including Lightning's, still show.
NOISE_LOG_PREFIXES = (
    "💡 Tip:",  # Lightning's adverts for its litlogger and litmodels services
    "GPU available:", "TPU available:", "HPU available:",  # the stage's start line names the device it uses
)
NOISE_WARNINGS = (
    # Lightning 2.6's own pytree helper on torch 2.13; nothing isa4d calls
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)


class UsageError(Exception):
    """A bad command line, already explained in one line."""


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).lstrip().startswith(NOISE_LOG_PREFIXES)


def quiet_upstream() -> None:
    """Filter the upstream messages listed in NOISE_LOG_PREFIXES and NOISE_WARNINGS (the one place that does)."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())
        for handler in logger.handlers:
            if not any(isinstance(f, _DropNoise) for f in handler.filters):
                handler.addFilter(_DropNoise())
    for pattern in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


class ISA4DCLI(LightningCLI):
    """LightningCLI with the project's defaults; models and datamodules come from the config's class_path.
    `stage_name` names the run on the console and in usage lines (`sample` for predict with the video writer)."""

    def __init__(self, *args, stage_name: str | None = None, **kwargs):
        self.stage_name = stage_name
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--metrics_json", type=str | None, default=None,
                            help="validate/test: write the metrics here (default: <log_dir>/metrics_<subcommand>.json)")

    def parse_arguments(self, parser, args) -> None:
        """Usage lines say `isa4d <command>`; a parse error becomes one UsageError line (no usage dump)."""
        parser.prog = "isa4d"
        for name, sub in getattr(self, "_subcommand_parsers", {}).items():
            sub.prog = f"isa4d {self.stage_name or name}" if name == "predict" else f"isa4d {name}"
            if name == "predict" and self.stage_name == "sample":
                sub.description = SAMPLE_DESCRIPTION
        args = sys.argv[1:] if args is None else args
        try:
            if isinstance(args, dict):
                self.config = parser.parse_object(args)
            else:
                self.config = parser.parse_args(args)
        except ArgumentError as e:
            command = next((a for a in args if a in SUBCOMMANDS), None) if isinstance(args, list) else None
            sub = getattr(self, "_subcommand_parsers", {}).get(command, parser)
            raise UsageError(explain_parse_error(str(e), sub)) from e

    def instantiate_trainer(self, **kwargs):
        """The console callbacks: start/end lines always, the progress bar unless the trainer config turns it off."""
        trainer_config = self._get(self.config_init, "trainer", default={})
        extra = [StageSummary(self.stage_name)]
        if trainer_config.get("enable_progress_bar") is not False:
            extra.append(ConsoleProgressBar())
        previous = self.trainer_defaults.get("callbacks", [])
        self.trainer_defaults["callbacks"] = [*previous, *extra]
        try:
            return super().instantiate_trainer(**kwargs)
        finally:
            self.trainer_defaults["callbacks"] = previous

    def before_fit(self) -> None:
        # Lightning warns about every module in eval mode at the start of training; a frozen submodule (the DiT's
        # VAE) is meant to be. The warning is filtered for exactly that count, so any other eval module still shows.
        frozen = [m for m in self.model.children()
                  if any(True for _ in m.parameters()) and not any(p.requires_grad for p in m.parameters())]
        if frozen:
            count = sum(len(list(m.modules())) for m in frozen)
            warnings.filterwarnings("ignore", message=rf"Found {count} module\(s\) in eval mode")

    def _evaluating(self) -> None:
        # A checkpoint written by training holds the states of training's callbacks (checkpointing, EMA, RNG);
        # evaluation and sampling do not need them, so Lightning's note that they are absent is filtered here only.
        warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`")

    before_validate = before_test = before_predict = _evaluating

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


def run_cli(args: list[str] | None = None, run: bool = True, save_config: bool = True,
            stage_name: str | None = None) -> ISA4DCLI:
    """`save_config`: write the resolved config.yaml into the run's log folder (off for `isa4d sample`)."""
    mode = {"parser_mode": "omegaconf+", "exit_on_error": False}
    quiet_upstream()
    return ISA4DCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={**mode, "prog": "isa4d", **{c: dict(mode) for c in SUBCOMMANDS}},
        trainer_defaults={"callbacks": [LoaderHealthLogger(), Throughput()], "enable_model_summary": False},
        save_config_kwargs={"overwrite": True},
        **({} if save_config else {"save_config_callback": None}),
        args=args,
        run=run,
        stage_name=stage_name,
    )


# ----------------------------------------------------------------------------- one-line parse errors
def _type_name(text: str) -> str:
    """`<class 'int'>` -> `int`."""
    return re.sub(r"<class '(?:builtins\.)?([\w.]+)'>", r"\1", text)


def _closest(name: str, candidates: typing.Iterable[str]) -> str:
    found = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.6)
    return f" (did you mean --{found[0]}?)" if found else ""


def _option_keys(parser) -> list[str]:
    return [o[2:] for a in getattr(parser, "_actions", []) for o in a.option_strings if o.startswith("--")]


def _unwrap(annotation):
    """X from Optional[X] / X | None; None for anything that is not one class."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if args:
        return args[0] if len(args) == 1 and inspect.isclass(args[0]) else None
    return annotation if inspect.isclass(annotation) else None


def class_keys(cls, depth: int = 2) -> list[str]:
    """The init argument names of `cls` (dotted into dataclass and class arguments, `depth` levels)."""
    init = cls if is_dataclass(cls) else cls.__init__
    try:
        hints = typing.get_type_hints(init)
    except Exception:  # unresolvable annotations: names only
        hints = {}
    if is_dataclass(cls):
        names = [f.name for f in fields(cls)]
    else:
        names = [n for n, p in inspect.signature(cls.__init__).parameters.items()
                 if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    keys = []
    for name in names:
        keys.append(name)
        sub = _unwrap(hints.get(name))
        if depth > 1 and sub is not None and sub.__module__.startswith("isa4d") and not issubclass(sub, type):
            keys += [f"{name}.{k}" for k in class_keys(sub, depth - 1)]
    return keys


def _import(path: str):
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except Exception:
        return None


def explain_parse_error(message: str, parser=None) -> str:
    """jsonargparse's many-line error -> one line naming the option, with the closest valid key for a typo."""
    keys = re.findall(r'Parser key "([^"]+)"', message)
    class_path = re.search(r"class_path '([\w.]+)'", message)
    prefix = f"{keys[0]}.init_args." if class_path and keys else ""
    inner_keys = keys[1:] if class_path else keys
    unknown = re.search(r"unrecognized arguments: (.+)", message, re.IGNORECASE)
    rejected = re.search(r"Option '([^']+)' is not accepted", message)
    if unknown or rejected:
        name = rejected.group(1) if rejected else unknown.group(1).split()[0].lstrip("-").split("=")[0]
        if class_path:
            cls = _import(class_path.group(1))
            candidates = [prefix + k for k in class_keys(cls)] if cls is not None else []
        else:
            candidates = _option_keys(parser) if parser is not None else []
        return f"unknown option --{prefix}{name}{_closest(prefix + name, candidates)}"
    missing = re.search(r"File does not exist: '?([^'\n]+)'?", message)
    if missing:
        what = "config file" if keys[:1] == ["config"] else f"--{keys[-1]}" if keys else "file"
        return f"{what} not found: {os.path.relpath(missing.group(1))}"
    expected = re.search(r"Expected a (.+?)\. Got value: (.+)", message)
    if expected and inner_keys:
        got = expected.group(2).strip()
        return f"--{prefix}{inner_keys[-1]}: expected {_type_name(expected.group(1))}, got {got!r}"
    required = re.search(r"arguments are required: (.+)", message)
    if required:  # a model preset alone, or a data config alone: name the config to add (README "Training")
        names = [n.strip().split(".")[-1] for n in required.group(1).split(",")]
        hint = {"data": "no data config: add one after the model preset, e.g. -c configs/data/toy.yaml "
                        "(configs/data/ holds them)",
                "model": "no model config: add a stage preset, e.g. -c configs/vae/tiny.yaml or "
                         "-c configs/dit/tiny.yaml"}
        return "; ".join(hint.get(n, f"--{n} is required") for n in names)
    invalid_choice = re.search(r"invalid choice: '([^']+)'", message)
    if invalid_choice:
        commands = [c.split()[0] for c, _ in COMMANDS]
        found = difflib.get_close_matches(invalid_choice.group(1), commands, n=1)
        return f"unknown command '{invalid_choice.group(1)}'" + (f" (did you mean {found[0]}?)" if found else "") + \
               "; isa4d --help lists the commands"
    # anything else: the innermost reason, named by its key
    lines = [ln.strip(" -") for ln in message.splitlines() if ln.strip()]
    meta = ("Given value", "Subtypes", "Errors:", "Expected a <class 'NoneType'>", "Does not validate",
            "Problem with given class_path", "Parser key")
    lines = [ln for ln in lines if not ln.startswith(meta)]
    reason = lines[-1] if lines else message.strip().splitlines()[0]
    key = f"--{prefix}{inner_keys[-1]}: " if inner_keys else ""
    return _type_name(key + reason)


# ----------------------------------------------------------------------------- commands
def _log_to_stderr() -> None:
    """isa4d's own INFO lines (checkpoint save times, resumed data positions) on stderr, once."""
    logger = logging.getLogger("isa4d")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def help_text() -> str:
    width = max(len(c) for c, _ in COMMANDS)
    rows = "\n".join(f"  {c:<{width}}  {h}" for c, h in COMMANDS)
    return (f"usage: isa4d <command> [options]\n\nisa4d {__version__}: train and sample 4D human video generators "
            f"(causal video VAE + ISA-DiT).\n\ncommands:\n{rows}\n\n"
            f"`isa4d <command> --help` lists a command's options. --debug (or ISA4D_DEBUG=1) shows the traceback of "
            f"an error.\nDocs: README.md, docs/.")


def version_text() -> str:
    import lightning
    import torch

    return f"isa4d {__version__} (torch {torch.__version__}, lightning {lightning.__version__})"


def _export(argv: list[str]) -> int:
    """`isa4d export --ckpt_path CKPT --out OUT [--ema] [--submodule vae]`; `export CKPT OUT` still works."""
    import argparse

    from isa4d.training.export import __doc__ as export_doc
    from isa4d.training.export import export

    ap = argparse.ArgumentParser(prog="isa4d export", description=export_doc.split("\n\n")[0].split(": ", 1)[-1])
    ap.add_argument("--ckpt_path", help="sharded checkpoint folder or Lightning .ckpt file")
    ap.add_argument("--out", help="output .safetensors file")
    ap.add_argument("--ema", action="store_true", help="export the EMA weights")
    ap.add_argument("--submodule", default=None, help="export one submodule (e.g. vae), without its prefix")
    ap.add_argument("positional", nargs="*", help=argparse.SUPPRESS)
    ap.error = lambda message: (_ for _ in ()).throw(UsageError(f"export: {message}"))  # one line, no usage dump
    a = ap.parse_args(argv)
    if a.positional:
        if len(a.positional) != 2 or a.ckpt_path or a.out:
            raise UsageError("export: give --ckpt_path CKPT --out OUT")
        a.ckpt_path, a.out = a.positional
        print("isa4d export: `export CKPT OUT` is deprecated; use `export --ckpt_path CKPT --out OUT`",
              file=sys.stderr)
    if not a.ckpt_path or not a.out:
        raise UsageError("export: --ckpt_path and --out are required")
    path = export(a.ckpt_path, a.out, a.ema, a.submodule)
    print(f"wrote {path}")
    return 0


def _data(argv: list[str]) -> int:
    if argv[:1] == ["inspect"]:
        from isa4d.data.inspect import main as inspect_main

        return inspect_main(argv[1:])
    raise UsageError("usage: isa4d data inspect URLS [--decode] [--json PATH]")


def _dispatch(args: list[str]) -> int:
    command = args[0] if args else "--help"
    if command in ("-h", "--help", "help"):
        print(help_text())
        return 0
    if command in ("version", "--version", "-V"):
        print(version_text())
        return 0
    if command == "data":
        return _data(args[1:])
    if command == "export":
        return _export(args[1:])
    if command == "predict":  # VAEModule has no predict step; stage 2's prediction is `isa4d sample`
        print("isa4d: no `predict` command: `isa4d sample` writes stage 2's videos (docs/inference.md); "
              "`isa4d validate` / `isa4d test` score either stage", file=sys.stderr)
        return 2
    if command == "sample":  # `isa4d predict` + the callback that writes the videos (docs/inference.md)
        run_cli(["predict", *args[1:], "--trainer.callbacks+=isa4d.inference.writer.SampleWriter"], save_config=False,
                stage_name="sample")
        return 0
    run_cli(args)
    return 0


def _one_line(error: BaseException) -> str:
    """An exception's message on one line: the last line of a loader worker's re-raised traceback, types named
    where the message alone would not say what went wrong."""
    text = str(error).strip()
    if "Original Traceback" in text:  # torch's DataLoader re-raises a worker's exception with its traceback
        text = [ln for ln in text.splitlines() if ln.strip()][-1]
        return text.strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    text = "; ".join(lines) if lines else ""
    plain = (ValueError, OSError, RuntimeError, UsageError)
    named = isinstance(error, plain) or type(error).__module__.startswith("isa4d")
    return text if named and text else f"{type(error).__name__}: {text}" if text else type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """The console script. Exit status: 0 done, 1 a failed run or check, 2 a bad command line."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("ISA4D_DEBUG", "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    _log_to_stderr()
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("isa4d: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        usage = isinstance(e, UsageError)
        hint = "" if usage else " (run with --debug for the traceback)"
        print(f"isa4d: error: {_one_line(e)}{hint}", file=sys.stderr)
        return 2 if usage else 1


if __name__ == "__main__":
    sys.exit(main())
