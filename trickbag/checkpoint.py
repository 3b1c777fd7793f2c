"""Checkpoints that are safe to load and safe to crash during.

A checkpoint is a folder::

    runs/digits-001/best_metric-epoch007-accuracy=0.9731/
        model.safetensors   weights (safetensors: loading never runs code)
        state.pt            training state (optimizer, scheduler, scaler, mixer, EMA, RNG, ...); plain tensors and
                            Python scalars only, loaded with torch.load(weights_only=True)
        meta.json           resolved config, class names, epoch, metrics, trickbag version

and a stable symlink ``runs/digits-001/best_metric -> best_metric-epoch007-accuracy=0.9731`` so the same path
works for every run. Saving writes a fresh folder under a temporary name, fsyncs it, renames it into place and
only then swaps the symlink with ``os.replace`` (atomic on POSIX); the previous checkpoint is deleted last. A
crash (even ``kill -9``) at any point leaves the previous checkpoint and its pointer intact.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from trickbag import __version__

KINDS = ("last", "best_loss", "best_metric")
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "state.pt"
META_FILE = "meta.json"


@dataclass
class Checkpoint:
    """A loaded checkpoint: weights, training state (empty for best_* checkpoints) and metadata."""

    path: Path
    weights: dict[str, torch.Tensor]
    state: dict[str, Any]
    meta: dict[str, Any]


def checkpoint_name(kind: str, epoch: int, value_name: str | None = None, value: float | None = None) -> str:
    """``best_metric-epoch007-accuracy=0.9731``; ``last-epoch010`` when no value is given. Epochs count from 1."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} not in {KINDS}")
    name = f"{kind}-epoch{epoch:03d}"
    if value_name is not None and value is not None:
        name += f"-{value_name}={value:.4f}"
    return name


def _default_mode(directory: bool) -> int:
    """Permissions a plain open()/mkdir() would give under the current umask (mkstemp/mkdtemp use 0o600/0o700)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def fsync_path(path: Path) -> None:
    """fsync a file or a directory so a rename that follows is durable after power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file + fsync + os.replace: readers see the old or the new file."""
    path = Path(path)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, _default_mode(directory=False))
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def save_checkpoint(
    run_dir: str | Path,
    kind: str,
    *,
    weights: dict[str, torch.Tensor],
    meta: dict[str, Any],
    state: dict[str, Any] | None = None,
    value_name: str | None = None,
    value: float | None = None,
) -> Path:
    """Write one checkpoint folder atomically and point ``run_dir/kind`` at it; return the folder.

    Args:
        weights: a model ``state_dict`` (tensors are copied to CPU and made contiguous).
        meta: JSON-serialisable metadata; ``epoch`` (1-based) is required.
        state: training state of plain tensors / numbers / strings / lists / dicts (``weights_only`` loadable).
    """
    run_dir = Path(run_dir)
    if "epoch" not in meta:
        raise ValueError("meta must contain 'epoch'")
    final = run_dir / checkpoint_name(kind, int(meta["epoch"]), value_name, value)
    for stale in run_dir.glob(f".{kind}-*.tmp"):  # left by a process killed while saving (one writer per run)
        shutil.rmtree(stale, ignore_errors=True)
    temp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".{kind}-", suffix=".tmp"))
    try:
        tensors = {key: tensor.detach().to("cpu").contiguous().clone() for key, tensor in weights.items()}
        save_file(tensors, str(temp / WEIGHTS_FILE), metadata={"format": "pt"})
        buffer = io.BytesIO()
        torch.save(state or {}, buffer)
        (temp / STATE_FILE).write_bytes(buffer.getvalue())
        full_meta = {"kind": kind, "trickbag_version": __version__, **meta}
        (temp / META_FILE).write_text(
            json.dumps(full_meta, indent=2, default=_json_default), encoding="utf-8"
        )
        for file in temp.iterdir():
            fsync_path(file)
        os.chmod(temp, _default_mode(directory=True))
        fsync_path(temp)
        previous = resolve_pointer(run_dir / kind)
        # The same epoch saved again (a resumed run repeating an epoch that was cut short): never delete the
        # folder the pointer may still name before the new one is in place; take a fresh name instead.
        base, copy = final, 1
        while final.exists():
            final, copy = base.with_name(f"{base.name}-{copy}"), copy + 1
        os.replace(temp, final)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    _point(run_dir / kind, final.name)
    fsync_path(run_dir)
    if previous is not None and previous.resolve() != final.resolve():
        shutil.rmtree(previous, ignore_errors=True)
    return final


def _point(link: Path, target_name: str) -> None:
    temp = link.parent / f".{link.name}.link.tmp"
    temp.unlink(missing_ok=True)
    os.symlink(target_name, temp)
    os.replace(temp, link)


def resolve_pointer(link: Path) -> Path | None:
    """The folder a ``run_dir/kind`` symlink points at, or None when there is no valid pointer yet."""
    if not link.is_symlink():
        return None
    target = link.parent / os.readlink(link)
    return target if target.is_dir() else None


def resolve_checkpoint(path: str | Path, default_kind: str = "best_metric") -> Path:
    """Accept a checkpoint folder, a ``run_dir/kind`` pointer or a run folder (-> its ``default_kind``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if (path / META_FILE).is_file():
        return path.resolve()
    candidate = path / default_kind
    if (candidate / META_FILE).is_file():
        return candidate.resolve()
    raise FileNotFoundError(
        f"{path} is not a checkpoint (no {META_FILE}) nor a run folder with a '{default_kind}' checkpoint"
    )


def load_checkpoint(
    path: str | Path, *, default_kind: str = "best_metric", with_state: bool = True
) -> Checkpoint:
    """Load a checkpoint without executing any code from it.

    Weights come from safetensors; the training state through ``torch.load(weights_only=True)``, which refuses
    pickled objects other than tensors and plain containers — a tampered ``state.pt`` raises ValueError instead
    of running its payload.
    """
    folder = resolve_checkpoint(path, default_kind)
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{folder / META_FILE}: not valid JSON ({error})") from None
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(f"checkpoint weights missing: {weights_path}")
    try:
        weights = load_file(str(weights_path))
    except Exception as error:  # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(f"{weights_path}: not a valid safetensors file ({error})") from None
    state: dict[str, Any] = {}
    if with_state and (folder / STATE_FILE).is_file():
        state = load_state_file(folder / STATE_FILE)
    return Checkpoint(path=folder, weights=weights, state=state, meta=meta)


def load_state_file(path: str | Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``; anything else than tensors/plain data -> ValueError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"{path}: refused to load training state: it is not plain tensors/data "
            f"(loading it could run code). Details: {first_line}"
        ) from None


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"meta value of type {type(value).__name__} is not JSON serialisable")


# ---------------------------------------------------------------------------------------------------------------
# RNG state: everything a resumed run needs to draw the same random numbers as an uninterrupted one.


def capture_rng_state() -> dict[str, Any]:
    """Global RNG states (torch CPU/CUDA, numpy, python) as weights_only-loadable data."""
    import random

    import numpy as np

    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(position),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {"version": version, "state": list(python_state), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng_state``."""
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached"],
        )
    )
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["state"]), python_state["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Saves ``last`` / ``best_loss`` / ``best_metric`` checkpoints of one run with shared metadata.

    Args:
        run_dir: the run folder.
        meta: metadata stored with every checkpoint (resolved config, class names, image shape, mean/std).
    """

    def __init__(self, run_dir: str | Path, meta: dict[str, Any]) -> None:
        self.run_dir = Path(run_dir)
        self.meta = dict(meta)

    def save(
        self,
        kind: str,
        model: torch.nn.Module,
        *,
        epoch: int,
        state: dict[str, Any] | None = None,
        value_name: str | None = None,
        value: float | None = None,
        scores: dict[str, float] | None = None,
        metrics: Any = None,
    ) -> Path:
        meta = {**self.meta, "epoch": epoch, "scores": scores or {}}
        if metrics is not None:  # the confusion matrix of this evaluation, for `trickbag report`
            meta["confusion_matrix"] = metrics.confusion_matrix().tolist()
        return save_checkpoint(
            self.run_dir,
            kind,
            weights=model.state_dict(),
            meta=meta,
            state=state,
            value_name=value_name,
            value=value,
        )

    def latest(self, kind: str) -> Path | None:
        return resolve_pointer(self.run_dir / kind)
