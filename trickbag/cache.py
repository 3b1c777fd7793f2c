"""The decoded-image cache: where it lives, an index of its entries, and pruning.

Entries are ``<folder>/<key>.npz`` files written by ``trickbag.images`` (temp file + rename, so a reader never
sees half a file). ``index.json`` records, per entry, the dataset it came from, its size and when a run last used
it; every use updates it under a file lock (``index.lock``), so concurrent runs do not lose each other's updates.
Pruning removes entries unused for ``max_age_days`` (default 30), then the least recently used ones until the
total fits ``max_bytes`` (default 20 GB); it never removes the entry in use, nor a temp file that a writer may
still be filling (only temp files older than a day, left by a killed process).

Location, first that is set: the ``cache_dir`` argument (config ``data.cache_dir``), ``$TRICKBAG_CACHE_DIR``,
``$XDG_CACHE_HOME/trickbag``, ``~/.cache/trickbag``. Never the dataset folder: datasets may be read-only or
shared.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MAX_AGE_DAYS = 30.0
DEFAULT_MAX_BYTES = 20 * 10**9
ENTRY_SUFFIX = ".npz"
INDEX_FILE = "index.json"
STALE_TEMP_SECONDS = 24 * 3600  # no writer takes a day to write one file: such a temp file is left by a crash
DAY = 24 * 3600.0


def cache_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder (not created): ``cache_dir``, else $TRICKBAG_CACHE_DIR, $XDG_CACHE_HOME/trickbag, ~/.cache/trickbag."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("TRICKBAG_CACHE_DIR"):
        return Path(os.environ["TRICKBAG_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "trickbag"
    return Path.home() / ".cache" / "trickbag"


@dataclass
class CacheEntry:
    """One cached dataset: file, size in bytes, last use (Unix time), and the dataset it was decoded from."""

    path: Path
    bytes: int
    last_used: float
    source: str


@contextmanager
def _locked_index(folder: Path):
    """The index as a dict, written back atomically on exit, under an exclusive lock."""
    with open(folder / "index.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            index = _read_index(folder)
            yield index
            fd, temp = tempfile.mkstemp(dir=folder, prefix=".index.", suffix=".tmp")
            with os.fdopen(fd, "w") as handle:
                json.dump(index, handle, indent=1, sort_keys=True)
            os.replace(temp, folder / INDEX_FILE)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read_index(folder: Path) -> dict[str, dict]:
    try:
        index = json.loads((folder / INDEX_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # none yet, or damaged: rebuilt from the files
        return {}
    return index if isinstance(index, dict) else {}


def record_use(entry: Path, source: str, now: float | None = None) -> None:
    """Note in the index that ``entry`` (a cache file) was just used for dataset ``source``."""
    now = time.time() if now is None else now
    with _locked_index(entry.parent) as index:
        index[entry.name] = {"bytes": entry.stat().st_size, "last_used": now, "source": source}


def list_entries(folder: str | os.PathLike) -> list[CacheEntry]:
    """Every entry file in ``folder``, most recently used first; files missing from the index use their mtime."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    index = _read_index(folder)
    entries = []
    for path in folder.glob(f"*{ENTRY_SUFFIX}"):
        try:
            stat = path.stat()
        except FileNotFoundError:  # pruned by another process meanwhile
            continue
        record = index.get(path.name, {})
        entries.append(
            CacheEntry(
                path, stat.st_size, float(record.get("last_used", stat.st_mtime)), record.get("source", "?")
            )
        )
    return sorted(entries, key=lambda entry: entry.last_used, reverse=True)


def prune(
    folder: str | os.PathLike,
    *,
    max_age_days: float = DEFAULT_MAX_AGE_DAYS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    keep: tuple[Path, ...] = (),
    now: float | None = None,
) -> list[Path]:
    """Remove entries unused for ``max_age_days``, then least recently used ones above ``max_bytes`` in total.

    Args:
        keep: entries never removed (the one a run is using).
        now: the current Unix time (tests pass a fixed one).

    Returns:
        The removed files.
    """
    if max_age_days < 0 or max_bytes < 0:
        raise ValueError(f"max_age_days and max_bytes must be >= 0, got {max_age_days!r} and {max_bytes!r}")
    folder = Path(folder)
    now = time.time() if now is None else now
    kept = {Path(p).resolve() for p in keep}
    entries = list_entries(folder)
    doomed = [e for e in entries if now - e.last_used > max_age_days * DAY and e.path.resolve() not in kept]
    survivors = [e for e in entries if e not in doomed]
    total = sum(e.bytes for e in survivors)
    for entry in reversed(survivors):  # least recently used first
        if total <= max_bytes:
            break
        if entry.path.resolve() not in kept:
            doomed.append(entry)
            total -= entry.bytes
    for temp in folder.glob("*.tmp"):
        try:
            if now - temp.stat().st_mtime > STALE_TEMP_SECONDS:
                temp.unlink()
        except FileNotFoundError:
            pass
    return _remove(folder, [e.path for e in doomed])


def clear(
    folder: str | os.PathLike, older_than_days: float | None = None, now: float | None = None
) -> list[Path]:
    """Remove every entry, or those unused for more than ``older_than_days``; return the removed files."""
    if older_than_days is not None and older_than_days < 0:
        raise ValueError(f"older_than_days must be >= 0, got {older_than_days!r}")
    now = time.time() if now is None else now
    entries = list_entries(folder)
    if older_than_days is not None:
        entries = [e for e in entries if now - e.last_used > older_than_days * DAY]
    # The hardware probe's cached choices (trickbag.hardware) live in probes/: a full clear forgets them too.
    probes = sorted((Path(folder) / "probes").glob("*.json")) if older_than_days is None else []
    for probe in probes:
        probe.unlink(missing_ok=True)
    return _remove(Path(folder), [e.path for e in entries]) + probes


def _remove(folder: Path, paths: list[Path]) -> list[Path]:
    if not paths:
        return []
    removed = []
    with _locked_index(folder) as index:
        for path in paths:
            # unlink, not truncate: a process that already opened the file keeps reading it (POSIX)
            path.unlink(missing_ok=True)
            index.pop(path.name, None)
            removed.append(path)
    return removed


def format_size(num_bytes: float) -> str:
    """``512 B``, ``1.5 KB``, ``20.0 GB`` (decimal units, as disks are sold)."""
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1000 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    return ""
