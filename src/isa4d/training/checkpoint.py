"""Checkpoints that are published only when complete, so a kill at any moment leaves the previous `last`.

`AtomicCheckpoint` is Lightning's ModelCheckpoint with three changes:

* Atomic saves. Every checkpoint is written under `<dirpath>/.store/` with a `.partial` suffix, renamed when
  complete, then published under its name in one `os.replace`: a single file replaces the old one; a sharded
  (DCP) folder is published as a relative symlink `<name>.ckpt -> .store/<name>.<id>.ckpt`, swapped atomically,
  and the folder it replaced is deleted afterwards. A process killed mid-save leaves a `.partial` (removed at
  the next start) and the previous checkpoint in place. Loading, `--ckpt_path last` and `isa4d export` follow
  the link.
* A stable folder: without `dirpath` it is `<default_root_dir>/checkpoints`, not the logger's versioned folder,
  so `fit --ckpt_path last` finds the previous run's `last.ckpt`.
* `monitor="model"` takes the metric and mode from the LightningModule's `checkpoint_monitor` attribute
  (VAEModule: ("val/l1", "min")), so one trainer config keeps the best checkpoint of either stage.

Reading: `load_torch_file` and `check_sharded` turn a damaged checkpoint (truncated, a text file, a missing or
short shard) into one CheckpointError line naming the file and the reason; `CheckedCheckpointIO` (the plugin of
the one-device trainer configs) does so for Lightning's own loading.

Keep the last N: `AtomicCheckpoint(monitor="step", mode="max", save_top_k=N, every_n_train_steps=E,
save_last=True)`; the best by validation: `AtomicCheckpoint(monitor="model", save_top_k=1, save_last=False,
filename="best-{step}")`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger("isa4d.checkpoint")
STORE = ".store"
PARTIAL = ".partial"


def _store(target: Path) -> Path:
    return target.parent / STORE


def publish(staged: Path, target: Path) -> None:
    """Make the complete checkpoint `staged` (in the store, named `*.partial`) visible as `target`, atomically."""
    final = staged.with_name(staged.name.removesuffix(PARTIAL))
    os.rename(staged, final)
    previous = target.resolve() if target.is_symlink() else None
    if final.is_dir():
        link = final.with_name(final.name + ".link")
        os.symlink(os.path.relpath(final, target.parent), link)
        if target.is_dir() and not target.is_symlink():  # a plain folder from elsewhere: move it aside first
            os.rename(target, final.with_name(f"{target.name}.{uuid.uuid4().hex[:8]}.old"))
        os.replace(link, target)
    else:
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(final, target)
    if previous is not None and previous.parent == _store(target).resolve() and previous != final.resolve():
        _remove(previous)
    _remove_old_asides(target)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _remove_old_asides(target: Path) -> None:
    for p in _store(target).glob(f"{target.name}.*.old"):
        _remove(p)


def unpublish(target: Path) -> None:
    """Delete a published checkpoint: the link and the folder it points to, or the file."""
    if target.is_symlink():
        real = target.resolve()
        target.unlink()
        if real.parent == _store(target).resolve():
            _remove(real)
    elif target.exists():
        _remove(target)


def clean_store(dirpath: Path) -> None:
    """Remove what interrupted saves left in the store: `.partial` entries, and entries no link points to."""
    store = dirpath / STORE
    if not store.is_dir():
        return
    linked = {p.resolve() for p in dirpath.iterdir() if p.is_symlink()}
    for p in store.iterdir():
        if p.name.endswith(PARTIAL) or p.resolve() not in linked:
            _remove(p)


def atomic_save(trainer: L.Trainer, filepath: str | Path, weights_only: bool = False) -> None:
    """`trainer.save_checkpoint(filepath)`, staged in the store and published when complete (all ranks call it)."""
    target = Path(filepath)
    token = trainer.strategy.broadcast(uuid.uuid4().hex[:12])
    staged = _store(target) / f"{target.stem}.{token}{target.suffix}{PARTIAL}"
    if trainer.is_global_zero:
        staged.parent.mkdir(parents=True, exist_ok=True)
    trainer.strategy.barrier()
    trainer.save_checkpoint(staged, weights_only)
    trainer.strategy.barrier()
    if trainer.is_global_zero:
        publish(staged, target)
    trainer.strategy.barrier()


class AtomicCheckpoint(ModelCheckpoint):
    """ModelCheckpoint with atomic publication, a stable default folder and `monitor="model"` (module doc)."""

    def __init__(self, dirpath: str | None = None, filename: str | None = None, monitor: str | None = None,
                 mode: str = "min", save_last: bool | None = True, save_top_k: int = 1,
                 every_n_train_steps: int | None = None, every_n_epochs: int | None = None,
                 save_weights_only: bool = False, save_on_train_epoch_end: bool | None = None,
                 verbose: bool = False, enable_version_counter: bool = True):
        self._from_model = monitor == "model"
        super().__init__(dirpath=dirpath, filename=filename, monitor="step" if self._from_model else monitor,
                         mode=mode, save_last=save_last, save_top_k=save_top_k,
                         every_n_train_steps=every_n_train_steps, every_n_epochs=every_n_epochs,
                         save_weights_only=save_weights_only, save_on_train_epoch_end=save_on_train_epoch_end,
                         verbose=verbose, enable_version_counter=enable_version_counter)
        self._saved_at: int | None = None  # the step of the saves below
        self._saved_before_validation: list[str] = []  # paths written at that step's batch end

    def _stable_dir(self, trainer: L.Trainer) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._stable_dir(trainer)
        if self._from_model:
            monitor = getattr(pl_module, "checkpoint_monitor", None)
            if monitor is None:
                raise ValueError(f"AtomicCheckpoint(monitor='model') needs {type(pl_module).__name__}."
                                 f"checkpoint_monitor = (metric, 'min' | 'max')")
            self.monitor, mode = monitor
            self.kth_value = torch.tensor(torch.inf if mode == "min" else -torch.inf)
            self.mode = mode
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and stage == "fit":
            clean_store(Path(self.dirpath))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any,
                           **kwargs: Any) -> None:
        # Lightning warns, under manual optimisation, that the checkpoint holds the weights after the step: that
        # is the state a resume at global_step needs.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
            super().on_train_batch_end(trainer, pl_module, *args, **kwargs)

    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        self._stable_dir(trainer)
        for link in Path(self.dirpath).glob(f"{self.CHECKPOINT_NAME_LAST}*{self.FILE_EXTENSION}"):
            if link.is_symlink() and not link.exists():
                raise FileNotFoundError(
                    f"{link} is a link to {os.readlink(link)}, which does not exist (the checkpoint folder copied "
                    f"without its {STORE}/?): copy the folder whole (cp -a) or remove the link to start from scratch")
        return super()._find_last_checkpoints(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """On resume, delete this folder's checkpoints of steps after the resumed one: saves of a run killed
        before its `last` caught up, which the restored top-k no longer tracks and which would never be rotated
        out (a save at the same step would be versioned `-v1` beside them)."""
        super().on_train_start(trainer, pl_module)
        if trainer.ckpt_path is None or not os.path.isdir(self.dirpath):
            return
        if trainer.is_global_zero:
            orphans = [p for p in Path(self.dirpath).iterdir() if p.suffix == self.FILE_EXTENSION
                       and not p.name.startswith(self.CHECKPOINT_NAME_LAST)
                       and (step := _step_of(p.name)) is not None and step > trainer.global_step]
            for p in orphans:
                unpublish(p)
            if orphans:
                log.warning("removed %d checkpoint(s) of steps after the resumed step %d: %s", len(orphans),
                            trainer.global_step, sorted(p.name for p in orphans))
        trainer.strategy.barrier()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A checkpoint written at this step's batch end was written before this validation, which may change
        state the checkpoint holds (the VAE's latent statistics): write it again, so a checkpoint of a
        validation step carries what that validation set."""
        stale = [p for p in self._saved_before_validation if self._saved_at == trainer.global_step]
        self._saved_before_validation = []
        super().on_validation_end(trainer, pl_module)
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        for path in stale:
            if self.file_exists(path, trainer):
                atomic_save(trainer, path, self.save_weights_only)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        atomic_save(trainer, filepath, self.save_weights_only)
        if self._saved_at != trainer.global_step:
            self._saved_at, self._saved_before_validation = trainer.global_step, []
        if not trainer.validating and filepath not in self._saved_before_validation:
            self._saved_before_validation.append(filepath)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            from weakref import proxy

            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        # Another AtomicCheckpoint may have just written the same `last` (e.g. a last-N one and the Makefile's).
        name = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
        for cb in trainer.checkpoint_callbacks:
            if (cb is not self and isinstance(cb, AtomicCheckpoint) and cb.last_model_path == name
                    and cb._last_global_step_saved == trainer.global_step and cb._last_checkpoint_saved == name):
                self.last_model_path = name
                return
        # `last` is replaced atomically, never versioned (last-v1.ckpt): also after the run folder moved.
        self.last_model_path = self.last_model_path or name
        super()._save_last_checkpoint(trainer, monitor_candidates)

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        if trainer.is_global_zero:
            unpublish(Path(filepath))
        trainer.strategy.barrier()

    def file_exists(self, filepath: Any, trainer: L.Trainer) -> bool:
        local = (os.path.exists(filepath) or os.path.islink(filepath)) if trainer.is_global_zero else False
        return trainer.strategy.reduce_boolean_decision(local, all=False)


def _step_of(name: str) -> int | None:
    match = re.search(r"step=(\d+)", name)
    return int(match.group(1)) if match else None


def save_last(trainer: L.Trainer) -> str:
    """Save `last` now through the trainer's AtomicCheckpoint with save_last (or into
    `<default_root_dir>/checkpoints/last.ckpt` without one); returns the path."""
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, AtomicCheckpoint) and cb.save_last:
            candidates = cb._monitor_candidates(trainer)
            name = cb.format_checkpoint_name(candidates, cb.CHECKPOINT_NAME_LAST)
            if not (cb._last_global_step_saved == trainer.global_step and cb.last_model_path == name
                    and cb._last_checkpoint_saved == name):
                cb._save_last_checkpoint(trainer, candidates)
            return cb.last_model_path
    path = os.path.join(trainer.default_root_dir, "checkpoints", "last.ckpt")
    atomic_save(trainer, path)
    return path


# ------------------------------------------------------------------------------------------------- reading


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message is one line naming the file and the reason."""


def _reason(e: BaseException, path: Path | None = None) -> str:
    """Why a torch.load failed, in words: from the file's bytes when it is one (a torch.save archive is a zip, whose
    end record a cut-off write lacks), else from the reader's message."""
    if path is not None and path.is_file():
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(max(0, path.stat().st_size - 65_557))  # the end record sits in the last 64 KiB + 22 bytes
            tail = f.read()
        if head.startswith(b"PK\x03\x04") and b"PK\x05\x06" not in tail:
            return "truncated (its zip archive has no end record): a save that was cut off?"
        if not head.startswith((b"PK", b"\x80")):
            return "not a torch checkpoint (a text file or another format)"
    text = str(e)
    if any(m in text for m in ("central directory", "PytorchStreamReader", "Ran out of input", "EOF")) \
            or isinstance(e, EOFError):
        return "truncated or damaged (not a complete torch.save archive): a save that was cut off?"
    if any(m in text for m in ("could not find MARK", "pop from empty list", "invalid load key", "unpickling stack")):
        return "not a torch checkpoint (a text file or another format)"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(e).__name__}: {first[:200]}"


def load_torch_file(path: str | Path, what: str = "checkpoint", **kwargs: Any) -> Any:
    """`torch.load(path, **kwargs)`, with FileNotFoundError or CheckpointError (one line, naming `path`) instead
    of the reader's own errors. A weights_only refusal of a sound file is re-raised unchanged (callers may retry
    without it)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path}: a folder, not a {what} file")
    try:
        return torch.load(path, **kwargs)
    except Exception as e:  # noqa: BLE001 - every reader error becomes one line naming the file
        if "Weights only load failed" in str(e):
            raise
        raise CheckpointError(f"{path}: cannot read this {what}: {_reason(e, path)}") from None


def check_sharded(path: str | Path) -> None:
    """Raise CheckpointError naming the file when a sharded (DCP) checkpoint folder's index (`.metadata`) or
    `meta.pt` is unreadable, or a shard file is missing or shorter than the index says; cheap (file sizes)."""
    from torch.distributed.checkpoint import FileSystemReader

    path = Path(path)
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path / '.metadata'}: cannot read the shard index: {_reason(e)}") from None
    need: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        name = getattr(info, "relative_path", None)
        if name is not None:
            need[name] = max(need.get(name, 0), int(info.offset) + int(info.length))
    for name, size in sorted(need.items()):
        shard = path / name
        if not shard.is_file():
            raise CheckpointError(f"{shard}: shard missing from the checkpoint")
        if shard.stat().st_size < size:
            raise CheckpointError(f"{shard}: truncated shard ({shard.stat().st_size} of {size} bytes)")
    meta = path / "meta.pt"
    if meta.exists():
        load_torch_file(meta, "checkpoint metadata", map_location="cpu", mmap=True, weights_only=True)


class CheckedCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, whose loading names the file and the reason when it fails (CheckpointError)
    instead of the reader's error (a miniz message without the path, "could not find MARK")."""

    def load_checkpoint(self, path: Any, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict:
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 - every reader error becomes one line naming the file
            if "Weights only load failed" in str(e):
                raise
            raise CheckpointError(f"{path}: cannot read this checkpoint: {_reason(e, Path(path))}") from None
