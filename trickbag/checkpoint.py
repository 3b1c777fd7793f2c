"""Checkpoints that are safe to load, safe to crash during, and checked for corruption on every load.

A checkpoint is a folder::

    runs/digits-001/best_metric-epoch007-accuracy=0.9731/
        model.safetensors   weights (safetensors: loading never runs code)
        state.pt            training state (optimizer, scheduler, scaler, mixer, EMA, RNG, ...); plain tensors and
                            Python scalars only, loaded with torch.load(weights_only=True)
        meta.json           resolved config, class names, epoch, metrics, trickbag version, and checksums:
                            ``files`` = {name: {"sha256", "bytes"}} of the two files above, ``meta_sha256`` = the
                            sha256 of meta.json's own content without that key (canonical JSON, sorted keys)

and a stable symlink ``runs/digits-001/best_metric -> best_metric-epoch007-accuracy=0.9731`` so the same path
works for every run. Saving serialises everything in memory first (so the files are hashed as they are written,
never re-read, and the size needed is known), writes a fresh folder under a temporary name, fsyncs it, renames
it into place and only then swaps the symlink with ``os.replace`` (atomic on POSIX); older folders are deleted
last. A crash (even ``kill -9``) at any point leaves the previous checkpoint and its pointer intact; an OS error
(disk full, read-only, no permission, a vanished folder) is one ``CheckpointWriteError`` saying so.

meta.json checks itself rather than through a sidecar: a sidecar would itself be unchecked, and one file keeps
the checkpoint a folder of three files as before.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors_bytes

from trickbag import __version__
from trickbag.cache import format_size

KINDS = ("last", "best_loss", "best_metric")
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
REQUIRED_META_KEYS = ("kind", "epoch", "trickbag_version")
CHECKSUM_KEYS = ("files", "meta_sha256")


class CheckpointCorruptError(ValueError):
    """A checkpoint file whose content is not what was written (checksum mismatch, truncated, unparsable)."""

    def __init__(self, message: str, path: Path, expected: str | None = None, actual: str | None = None):
        super().__init__(message)
        self.path, self.expected, self.actual = path, expected, actual


class CheckpointIOError(OSError):
    """An OS-level failure reading or writing a checkpoint: ``errno`` kept, ``str()`` the whole message."""

    def __str__(self) -> str:  # OSError's own would print "[Errno 28] ..." instead of our message
        return str(self.args[0]) if self.args else super().__str__()


class CheckpointWriteError(CheckpointIOError):
    """An OS-level failure while saving; the message names the step, the path and what to do next."""


class CheckpointReadError(CheckpointIOError):
    """An OS-level failure while loading (no permission, I/O error, a folder removed while reading)."""


def _from_os_error(cls: type[OSError], error: OSError, message: str) -> OSError:
    wrapped = cls(message)
    wrapped.errno, wrapped.strerror, wrapped.filename = error.errno, error.strerror, error.filename
    return wrapped


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


# ---------------------------------------------------------------------------------------------------------------
# Checksums


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical_json(meta: dict[str, Any]) -> bytes:
    """One byte string per JSON value (sorted keys, no spaces): what ``meta_sha256`` hashes."""
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()


def _sealed_meta(meta: dict[str, Any]) -> bytes:
    """meta.json's bytes with ``meta_sha256`` added; hashed from the parsed JSON, so loading recomputes it exactly."""
    parsed = json.loads(json.dumps(meta, default=_json_default))  # tuples -> lists, tensors -> lists, ...
    parsed["meta_sha256"] = sha256_hex(_canonical_json(parsed))
    return json.dumps(parsed, indent=2).encode()


def _parse_meta(data: bytes, path: Path, verify: bool) -> dict[str, Any]:
    """Parse meta.json; check its required keys and (when it has them and ``verify``) its own checksum."""
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointCorruptError(f"{path}: not valid JSON ({error})", path) from None
    if not isinstance(meta, dict):
        raise CheckpointCorruptError(f"{path}: not a JSON object", path)
    missing = [key for key in REQUIRED_META_KEYS if key not in meta]
    present = [key for key in CHECKSUM_KEYS if key in meta]
    if len(present) == 1:  # a flipped bit in the other key's name: never fall back to "old, unchecked"
        missing.append(next(key for key in CHECKSUM_KEYS if key not in meta))
    if missing:
        raise CheckpointCorruptError(f"{path}: required keys missing: {missing}", path)
    if present and verify:
        expected = meta.pop("meta_sha256")
        actual = sha256_hex(_canonical_json(meta))
        if actual != expected:
            raise CheckpointCorruptError(
                f"{path}: checksum mismatch (expected sha256 {expected}, got {actual}); the file was changed "
                "or corrupted after it was written",
                path,
                expected,
                actual,
            )
    meta.pop("meta_sha256", None)
    return meta


def _check_file(path: Path, meta: dict[str, Any]) -> None:
    """CheckpointCorruptError unless the file at ``path`` matches the sha256 meta.json recorded for it."""
    record = meta["files"].get(path.name)
    if not isinstance(record, dict) or "sha256" not in record:
        raise CheckpointCorruptError(f"{path}: no checksum recorded for it in {META_FILE}", path)
    try:
        with open(path, "rb") as handle:
            actual = hashlib.file_digest(handle, "sha256").hexdigest()
        size = path.stat().st_size
    except OSError as error:
        raise _read_error(path, error) from error
    if actual != record["sha256"]:
        raise CheckpointCorruptError(
            f"{path}: checksum mismatch (expected sha256 {record['sha256']}, got {actual}; {size} bytes, "
            f"{record.get('bytes', '?')} written); the file was changed or corrupted after it was written",
            path,
            record["sha256"],
            actual,
        )


# ---------------------------------------------------------------------------------------------------------------
# Saving


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _write_error(
    error: OSError, step: str, kind: str, run_dir: Path, needed: int, final: Path
) -> CheckpointWriteError:
    """One message: what failed and where, what to do, and which checkpoint is still there."""
    where = f" ({error.filename})" if error.filename else ""
    message = f"could not save the '{kind}' checkpoint in {run_dir}: {step} failed: {error.strerror or error}{where}"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f"{format_size(shutil.disk_usage(run_dir).free)} free"
        except OSError:
            free = "free space unknown"
        message += f"; the checkpoint needs {format_size(needed)} ({free}): free space or set output_dir to another disk"
    elif error.errno == errno.EROFS:
        message += "; the file system is read-only: set output_dir to a writable folder"
    elif error.errno in (errno.EACCES, errno.EPERM):
        message += "; no permission to write there: fix the folder's permissions or set output_dir elsewhere"
    elif error.errno == errno.ENOENT:
        message += "; the folder vanished while saving (deleted, or its disk unmounted?)"
    current = resolve_pointer(run_dir / kind)
    if current == final:  # only the fsync after the pointer swap failed
        message += f". The new checkpoint {run_dir / kind} -> {current.name} is in place (after a power cut it may not be)"
    elif current is not None:
        message += f". The previous checkpoint {run_dir / kind} -> {current.name} is intact"
    else:
        message += f". No earlier '{kind}' checkpoint exists"
    if kind == "last":
        message += f"; once fixed, `trickbag resume {run_dir}` continues from it"
    return _from_os_error(CheckpointWriteError, error, message)


def save_checkpoint(
    run_dir: str | Path,
    kind: str,
    *,
    weights: dict[str, torch.Tensor],
    meta: dict[str, Any],
    state: dict[str, Any] | None = None,
    value_name: str | None = None,
    value: float | None = None,
    keep: int = 1,
) -> Path:
    """Write one checkpoint folder atomically, with checksums, and point ``run_dir/kind`` at it; return the folder.

    Args:
        weights: a model ``state_dict`` (tensors are copied to CPU and made contiguous).
        meta: JSON-serialisable metadata; ``epoch`` (1-based) is required; ``files`` and ``meta_sha256`` are
            reserved (the checksums).
        state: training state of plain tensors / numbers / strings / lists / dicts (``weights_only`` loadable).
        keep: how many folders of this kind to keep (1: only the new one; 2: also the one before, a fallback
            for ``find_good_checkpoint`` if the newest is ever corrupted).

    Raises:
        CheckpointWriteError (an OSError): any OS-level failure; the temp folder is removed and the pointer still
            names the previous checkpoint (the message names it).
    """
    run_dir = Path(run_dir)
    if "epoch" not in meta:
        raise ValueError("meta must contain 'epoch'")
    if any(key in meta for key in CHECKSUM_KEYS):
        raise ValueError(f"meta keys {CHECKSUM_KEYS} are reserved for the checksums, got {sorted(meta)}")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be an int >= 1, got {keep!r}")
    link = run_dir / kind
    final = run_dir / checkpoint_name(kind, int(meta["epoch"]), value_name, value)
    tensors = {key: tensor.detach().to("cpu").contiguous().clone() for key, tensor in weights.items()}
    buffer = io.BytesIO()
    torch.save(state or {}, buffer)
    blobs = {
        WEIGHTS_FILE: save_safetensors_bytes(tensors, metadata={"format": "pt"}),
        STATE_FILE: buffer.getvalue(),
    }
    files = {name: {"sha256": sha256_hex(data), "bytes": len(data)} for name, data in blobs.items()}
    blobs[META_FILE] = _sealed_meta({"kind": kind, "trickbag_version": __version__, **meta, "files": files})
    needed = sum(len(data) for data in blobs.values())

    temp, step = None, "removing a stale temp folder"
    try:
        # Temp folders left by a process killed while saving, or by a cut-short delete (one writer per run).
        for stale in run_dir.glob(f".{kind}-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        step = "creating a temp folder"
        temp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".{kind}-", suffix=".tmp"))
        for name, data in blobs.items():
            step = f"writing {name}"
            _write_durably(temp / name, data)
        step = "syncing the temp folder"
        os.chmod(temp, _default_mode(directory=True))
        fsync_path(temp)
        # The same epoch saved again (a resumed run repeating an epoch that was cut short): never delete the
        # folder the pointer may still name before the new one is in place; take a fresh name instead.
        base, copy = final, 1
        while final.exists():
            final, copy = base.with_name(f"{base.name}-{copy}"), copy + 1
        step = f"renaming the temp folder to {final.name}"
        os.replace(temp, final)
        temp = None
        step = f"pointing {link.name} at {final.name}"
        _point(link, final.name)
        step = "syncing the run folder"
        fsync_path(run_dir)
    except BaseException as error:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
        elif (
            final.is_dir() and resolve_pointer(link) != final
        ):  # renamed, but the pointer still names the old
            shutil.rmtree(final, ignore_errors=True)
        if isinstance(error, OSError):
            raise _write_error(error, step, kind, run_dir, needed, final) from error
        raise
    _remove_older(run_dir, kind, final, keep)
    return final


def _point(link: Path, target_name: str) -> None:
    temp = link.parent / f".{link.name}.link.tmp"
    temp.unlink(missing_ok=True)
    os.symlink(target_name, temp)
    try:
        os.replace(temp, link)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


_EPOCH = re.compile(r"-epoch(\d+)(.*?)(?:-(\d+))?$")


def checkpoint_folders(run_dir: str | Path, kind: str) -> list[Path]:
    """Every ``kind-epochNNN...`` folder in ``run_dir`` with a meta.json, newest (epoch, then re-save) first."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} not in {KINDS}")

    def order(folder: Path) -> tuple[int, int]:
        match = _EPOCH.search(folder.name)
        return (int(match.group(1)), int(match.group(3) or 0)) if match else (-1, 0)

    found = [p for p in Path(run_dir).glob(f"{kind}-epoch*") if p.is_dir() and not p.is_symlink()]
    return sorted((p for p in found if (p / META_FILE).exists()), key=order, reverse=True)


def _remove_older(run_dir: Path, kind: str, final: Path, keep: int) -> None:
    """Delete this kind's folders beyond the newest ``keep`` (``final`` always kept). A failure only warns: the
    new checkpoint is in place, and a leftover folder is removed by the next save."""
    older = [p for p in checkpoint_folders(run_dir, kind) if p != final][keep - 1 :]
    for folder in older:
        # Renamed to a temp name first, so a half-deleted folder is never mistaken for a checkpoint.
        doomed = run_dir / f".{kind}-{folder.name}.deleting.tmp"
        try:
            os.replace(folder, doomed)
            shutil.rmtree(doomed)
        except OSError as error:
            warnings.warn(f"could not delete the old checkpoint {folder}: {error}", stacklevel=3)


def resolve_pointer(link: Path) -> Path | None:
    """The folder a ``run_dir/kind`` symlink points at, or None when there is no valid pointer yet."""
    if not link.is_symlink():
        return None
    target = link.parent / os.readlink(link)
    return target if target.is_dir() else None


# ---------------------------------------------------------------------------------------------------------------
# Loading


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


def _read_error(path: Path, error: OSError) -> CheckpointReadError:
    hint = {
        errno.EACCES: "; no permission to read it",
        errno.ENOENT: "; it vanished while loading (deleted, or its disk unmounted?)",
        errno.EIO: "; the disk reported an I/O error",
    }.get(error.errno or 0, "")
    message = f"could not read checkpoint file {path}: {error.strerror or error}{hint}"
    return _from_os_error(CheckpointReadError, error, message)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise _read_error(path, error) from error


def load_checkpoint(
    path: str | Path, *, default_kind: str = "best_metric", with_state: bool = True, verify: bool = True
) -> Checkpoint:
    """Load a checkpoint without executing any code from it, checking every file against its recorded sha256.

    Weights come from safetensors; the training state through ``torch.load(weights_only=True)``, which refuses
    pickled objects other than tensors and plain containers — a tampered ``state.pt`` raises ValueError instead
    of running its payload. Each file is hashed before it is parsed (this guards against storage corruption, not
    against a writer swapping files between the two reads). Checkpoints written
    before checksums existed (no ``files`` / ``meta_sha256`` in meta.json) load without verification.
    ``with_state=False`` neither reads nor verifies ``state.pt``.

    Raises:
        CheckpointCorruptError (a ValueError): a checksum mismatch naming the file with the expected and actual
            sha256, invalid JSON, missing keys, an unparsable safetensors file.
        CheckpointReadError (an OSError): the files could not be read (permission, I/O error, vanished folder).
        FileNotFoundError: no checkpoint at ``path``, or (old checkpoints) no weights file.
    """
    folder = resolve_checkpoint(path, default_kind)
    meta = _parse_meta(_read(folder / META_FILE), folder / META_FILE, verify)
    checked = verify and "files" in meta
    weights_path, state_path = folder / WEIGHTS_FILE, folder / STATE_FILE
    if (
        checked
    ):  # hashed by streaming, then parsed from the page cache: faster than parsing from bytes in memory
        _check_file(weights_path, meta)
        if with_state and STATE_FILE in meta["files"]:
            _check_file(state_path, meta)
    elif not weights_path.is_file():
        raise FileNotFoundError(f"checkpoint weights missing: {weights_path}")
    try:
        weights = load_file(str(weights_path))
    except OSError as error:
        raise _read_error(weights_path, error) from error
    except Exception as error:  # safetensors raises its own error types for truncated/corrupt files
        message = f"{weights_path}: not a valid safetensors file ({error})"
        raise CheckpointCorruptError(message, weights_path) from None
    state: dict[str, Any] = {}
    if with_state and state_path.is_file():
        state = load_state_file(state_path)
    return Checkpoint(path=folder, weights=weights, state=state, meta=meta)


def verify_checkpoint(path: str | Path, *, default_kind: str = "best_metric") -> Path:
    """Load ``path`` fully (checksums, parsing); return its folder or raise as ``load_checkpoint`` does."""
    return load_checkpoint(path, default_kind=default_kind).path


def find_good_checkpoint(run_dir: str | Path, kind: str = "last") -> tuple[Path | None, list[str]]:
    """The newest checkpoint of a run that loads and verifies, for ``resume`` to offer when ``kind`` is broken.

    Tries the ``run_dir/kind`` pointer's target, then the older folders of that kind (kept by ``keep`` > 1, or
    left by a save cut short), then the other kinds' (``best_metric``, ``best_loss``, ``last`` minus ``kind``),
    each newest first. Note that best_* checkpoints hold no training state: resuming from one restarts the
    optimizer and schedule, it does not continue bit-identically.

    Returns:
        (folder or None, problems): one line per candidate that failed, "<folder>: <why>", in the order tried.
    """
    run_dir = Path(run_dir)
    problems: list[str] = []
    link = run_dir / kind
    if link.is_symlink() and resolve_pointer(link) is None:
        problems.append(f"{link}: points at {os.readlink(link)}, which does not exist")
    candidates: list[Path] = []
    for other in [kind] + [k for k in ("best_metric", "best_loss", "last") if k != kind]:
        target = resolve_pointer(run_dir / other)
        for folder in ([target] if target is not None else []) + checkpoint_folders(run_dir, other):
            if folder.resolve() not in [c.resolve() for c in candidates]:
                candidates.append(folder)
    for folder in candidates:
        try:
            return verify_checkpoint(folder), problems
        except (ValueError, OSError) as error:  # corrupt / unreadable / vanished: say so, try the next one
            problems.append(f"{folder}: {error}")
    return None, problems


def load_state_file(path: str | Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``; anything else than tensors/plain data -> ValueError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as error:
        raise _read_error(Path(path), error) from error
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
        keep_last: ``last`` folders kept (2: the one before the newest too, a bit-exact fallback for resume).
    """

    def __init__(self, run_dir: str | Path, meta: dict[str, Any], keep_last: int = 1) -> None:
        self.run_dir = Path(run_dir)
        self.meta = dict(meta)
        self.keep_last = keep_last

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
            keep=self.keep_last if kind == "last" else 1,
        )

    def latest(self, kind: str) -> Path | None:
        return resolve_pointer(self.run_dir / kind)
