"""Image files decoded into an in-memory ``ImageSet``: image folders, CSV lists and prediction inputs.

Image folders and CSVs are decoded once, in parallel, into one uint8 array ``(N, C, H, W)`` cached as an
``.npz`` in the user cache folder (``trickbag.cache``: never inside the dataset) keyed by the dataset's absolute
root, file names, sizes, mtimes and decode size (written atomically); unreadable files are an error naming them,
or are skipped and listed. Images of mixed sizes are fitted to one size (``trickbag.transforms``: aspect handling,
resize + centre crop), so the cache holds them at that bounded size, never the originals. ``decode=False`` only
lists the files (``ImageSet.images`` is None): for ``trickbag.streaming``, which decodes per batch. ``ImageSet`` is defined here, with the loaders that build it, so that
``trickbag.data`` (splits, statistics, the batch loader) can import it without an import cycle.
"""

from __future__ import annotations

import csv
import hashlib
import os
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from trickbag import cache

__all__ = [
    "ImageSet",
    "load_image_folder",
    "load_csv",
    "load_images",
    "list_images",
    "list_image_folder",
    "IMAGE_EXTENSIONS",
]


# ---------------------------------------------------------------------------------------------------------
# The in-memory dataset
# ---------------------------------------------------------------------------------------------------------


def _check_tensor(name: str, value, dtype: torch.dtype, shape: str) -> None:
    """TypeError unless ``value`` is a ``dtype`` tensor with as many dimensions as ``shape`` names."""
    ndim = shape.count(",") + (0 if shape.endswith(",)") else 1)
    if not isinstance(value, torch.Tensor) or value.dtype != dtype or value.dim() != ndim:
        raise TypeError(
            f"{name} must be a tensor of dtype {str(dtype).removeprefix('torch.')} and shape {shape}, got "
            f"{getattr(value, 'dtype', type(value))} {tuple(getattr(value, 'shape', ()))}"
        )


@dataclass
class ImageSet:
    """A labelled image set held in memory.

    Attributes:
        images: (N, C, H, W) uint8 tensor, or None for a set that is listed, not decoded (``paths`` then
            required; ``trickbag.streaming`` decodes it batch by batch).
        labels: (N,) int64 tensor of class indices into ``classes``.
        classes: class names; ``classes[i]`` is the name of label ``i``.
        paths: source file of each image, or None for generated/embedded data.
        skipped: files that could not be decoded and were skipped (``data.skip_bad_images=true``).
    """

    images: torch.Tensor | None
    labels: torch.Tensor
    classes: list[str]
    paths: list[str] | None = None
    skipped: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_tensor("ImageSet.labels", self.labels, torch.int64, "(N,)")
        if self.images is None:
            if self.paths is None:
                raise ValueError("ImageSet without decoded images needs paths (the files to decode)")
        else:
            _check_tensor("ImageSet.images", self.images, torch.uint8, "(N, C, H, W)")
            if len(self.labels) != len(self.images):
                raise ValueError(f"ImageSet has {len(self.images)} images but {len(self.labels)} labels")
        if self.paths is not None and len(self.paths) != len(self.labels):
            raise ValueError(f"ImageSet has {len(self.labels)} images but {len(self.paths)} paths")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor) -> ImageSet:
        """The images at ``indices`` (a (K,) int64 tensor), keeping ``classes``."""
        paths = None if self.paths is None else [self.paths[i] for i in indices.tolist()]
        images = None if self.images is None else self.images[indices]
        return ImageSet(images, self.labels[indices], list(self.classes), paths)


# ---------------------------------------------------------------------------------------------------------
# Decoding image files (image folders, CSV lists, prediction inputs)
# ---------------------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
CACHE_VERSION = 3  # 2: the dataset root is part of the key; 3: aspect handling and crop fraction too
_FOLDER_LAYOUT = "root/<class name>/<image>.jpg|jpeg|png|bmp|webp, e.g. data/train/cat/0001.jpg"


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _visible_images(folder: Path) -> list[str]:
    """Image files under ``folder``, recursively, sorted; hidden files and everything in hidden folders skipped
    (``.thumbs/``, ``.trash/``, macOS ``._x.jpg``, an old ``.trickbag-cache/``)."""
    found = []
    for directory, subfolders, files in os.walk(folder):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        found += [os.path.join(directory, name) for name in files if _is_image(Path(name))]
    return sorted(found)


def list_images(path_or_dir: str | os.PathLike) -> list[str]:
    """One image file, or every image under a folder (recursively, sorted, hidden files and folders skipped).

    The one listing every command uses (train, eval, predict, mix, inspect), so they all see the same files.
    """
    path = Path(path_or_dir)
    if path.is_file():
        return [str(path)]
    if not path.is_dir():
        raise FileNotFoundError(f"no such image file or folder: {str(path)!r}")
    found = _visible_images(path)
    if not found:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {str(path)!r}")
    return found


def list_image_folder(root: str | os.PathLike) -> tuple[list[str], list[int], list[str]]:
    """The labelled files of ``root/<class>/...``: (paths, labels, classes), without decoding anything.

    Classes are the sorted non-hidden subfolders; each class folder is listed like ``list_images`` (recursively,
    hidden files and folders skipped). Paths are absolute.
    """
    root_path = Path(root).expanduser().resolve()
    if not root_path.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist; expected {_FOLDER_LAYOUT}")
    classes = sorted(p.name for p in root_path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{str(root)!r} has no class subfolders; expected {_FOLDER_LAYOUT}")
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = _visible_images(root_path / name)
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise ValueError(f"no images in the class subfolders of {str(root)!r}; expected {_FOLDER_LAYOUT}")
    return paths, labels, classes


@dataclass(frozen=True)
class _Fit:
    """How files become same-sized arrays: None size keeps each file's own; else ``transforms.eval_image``."""

    size: tuple[int, int] | None = None
    aspect: str = "squash"
    crop_fraction: float = 1.0


def _decode_one(path: str, fit: _Fit) -> tuple[np.ndarray | None, str | None]:
    """(H, W, 3) uint8 array or (None, reason). Greyscale, palette, RGBA, CMYK all become RGB."""
    from trickbag import transforms

    try:
        if fit.size is None:
            # RGBA: alpha dropped (not blended); L: grey copied to 3 channels
            return np.asarray(transforms.open_rgb(path)[0], dtype=np.uint8), None
        return transforms.eval_image(path, fit.size, fit.aspect, fit.crop_fraction), None
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError ... for bad files
        return None, f"{type(error).__name__}: {error}"


def _decode_chunk(paths: list[str], fit: _Fit) -> list[tuple[np.ndarray | None, str | None]]:
    return [_decode_one(path, fit) for path in paths]


def _decode_files(
    paths: list[str], size: _Fit, num_workers: int | None, progress: bool
) -> list[tuple[np.ndarray | None, str | None]]:
    """Decode every path, in parallel across processes when there are many, with a progress bar."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    workers = (os.cpu_count() or 1) if num_workers is None else num_workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"num_workers must be an int >= 0 (0 decodes in this process), got {num_workers!r}")
    console = Console(stderr=True)
    show = progress and console.is_terminal
    results: list = [None] * len(paths)
    # Chunks of a few hundred files keep the process-pool overhead (pickling, scheduling) small per image.
    chunk = max(16, min(512, len(paths) // max(1, 8 * workers) + 1))
    starts = list(range(0, len(paths), chunk))
    columns = (TextColumn("decoding images"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not show, transient=True) as bar:
        task = bar.add_task("decode", total=len(paths))
        if workers <= 1 or len(paths) < 4 * chunk:
            for start in starts:
                results[start : start + chunk] = _decode_chunk(paths[start : start + chunk], size)
                bar.advance(task, len(paths[start : start + chunk]))
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = {pool.submit(_decode_chunk, paths[s : s + chunk], size): s for s in starts}
                for future in as_completed(futures):
                    start = futures[future]
                    decoded = future.result()
                    results[start : start + len(decoded)] = decoded
                    bar.advance(task, len(decoded))
    return results


def _stack(paths: list[str], decoded: list[np.ndarray]) -> torch.Tensor:
    """(N, 3, H, W) uint8 from same-sized (H, W, 3) arrays; mixed sizes name an example of each."""
    if not decoded:
        return torch.zeros(0, 3, 0, 0, dtype=torch.uint8)
    first_shape = decoded[0].shape
    for path, array in zip(paths, decoded):
        if array.shape != first_shape:
            raise ValueError(
                f"images differ in size: {paths[0]!r} is {first_shape[0]}x{first_shape[1]} but {path!r} is "
                f"{array.shape[0]}x{array.shape[1]} (HxW); set data.image_size=N (size=(H, W) in Python) to "
                "fit them to one size"
            )
    return torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).contiguous()


def _bad_files_message(bad: list[tuple[str, str]]) -> str:
    shown = "; ".join(f"{path} ({reason})" for path, reason in bad[:10])
    more = f"; and {len(bad) - 10} more" if len(bad) > 10 else ""
    return f"{len(bad)} image(s) could not be decoded: {shown}{more}"


def load_images(
    paths: list[str],
    *,
    size: tuple[int, int] | None = None,
    num_workers: int | None = 0,
    progress: bool = False,
    aspect: str = "squash",
    crop_fraction: float = 1.0,
) -> torch.Tensor:
    """Decode image files for prediction, with the same RGB conversion and fitting as the loaders.

    Args:
        size, aspect, crop_fraction: as ``load_image_folder``; pass a checkpoint's preprocessing so a single
            photo is seen as the run's evaluation saw its images.

    Returns:
        (N, 3, H, W) uint8. Any unreadable file is a ValueError naming it; mixed sizes need ``size``.
    """
    fit = _make_fit(size, aspect, crop_fraction)
    results = _decode_files(list(paths), fit, num_workers, progress)
    bad = [(p, reason) for p, (_, reason) in zip(paths, results) if reason is not None]
    if bad:
        raise ValueError(_bad_files_message(bad))
    return _stack(list(paths), [array for array, _ in results])


def _make_fit(size, aspect: str, crop_fraction: float) -> _Fit:
    from trickbag.transforms import ASPECTS, eval_size

    if aspect not in ASPECTS:
        raise ValueError(f"aspect must be one of {ASPECTS}, got {aspect!r}")
    if size is not None:
        eval_size(1, crop_fraction)  # validates crop_fraction
    return _Fit(_check_size(size), aspect, float(crop_fraction))


def _check_size(size) -> tuple[int, int] | None:
    if size is None:
        return None
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
    ):
        raise ValueError(f"size must be None or (H, W) with two positive ints, got {size!r}")
    return int(size[0]), int(size[1])


def _cache_folder(cache_dir: str | os.PathLike | None) -> Path | None:
    """The cache folder (``trickbag.cache.cache_folder``), created; None (with a warning) if it cannot be written:
    decoding still works, it is just not cached."""
    folder = cache.cache_folder(cache_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
        problem = "not writable"
    except OSError as error:
        problem = str(error)
    warnings.warn(
        f"image cache folder {folder} cannot be used ({problem}); decoding without a cache. Set data.cache_dir=DIR "
        "or TRICKBAG_CACHE_DIR to a writable folder",
        stacklevel=4,
    )
    return None


def _read_cache(cache_file: Path) -> tuple[torch.Tensor, torch.Tensor, list] | None:
    try:
        with np.load(cache_file, allow_pickle=False) as stored:
            return (
                torch.from_numpy(stored["images"]),
                torch.from_numpy(stored["kept"]),
                [tuple(item) for item in stored["bad"].tolist()],
            )
    except FileNotFoundError:  # pruned by another process between the check and the read: decode again
        return None


def _write_cache(folder: Path, cache_file: Path, images: torch.Tensor, kept: torch.Tensor, bad: list) -> None:
    # Write to a temp file in the same folder and rename: a crash never leaves a half-written cache, and
    # pruning (which only removes *.npz entries and day-old temp files) never removes a file being written.
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".tmp", delete=False) as handle:
        np.savez(
            handle, images=images.numpy(), kept=kept.numpy(), bad=np.array(bad, dtype=str).reshape(-1, 2)
        )
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(handle.name, cache_file)


def _touch_and_prune(cache_file: Path, root: Path) -> None:
    """Record this use and prune old entries; a failure here only warns (the images are already loaded)."""
    try:
        cache.record_use(cache_file, str(root))
        cache.prune(cache_file.parent, keep=(cache_file,))
    except OSError as error:
        warnings.warn(f"image cache bookkeeping in {cache_file.parent} failed: {error}", stacklevel=4)


def _decode_cached(
    paths: list[str],
    labels: list[int],
    classes: list[str],
    *,
    root: Path,
    key_extra: str,
    cache_dir: str | os.PathLike | None,
    skip_bad_images: bool,
    num_workers: int | None,
    progress: bool,
    size: _Fit,
    decode: bool = True,
) -> ImageSet:
    """Decode ``paths`` once; later calls with the same files (names, sizes, mtimes) read the cache."""
    if not decode:
        return ImageSet(None, torch.tensor(labels, dtype=torch.int64), classes, list(paths))
    digest = hashlib.sha256(f"trickbag-cache v{CACHE_VERSION}\n{root}\n{size}\n{key_extra}\n".encode())
    for path, label in zip(paths, labels):
        stat = os.stat(path)
        digest.update(f"{os.path.abspath(path)}\t{stat.st_size}\t{stat.st_mtime_ns}\t{label}\n".encode())
    folder = _cache_folder(cache_dir)
    cache_file = None if folder is None else folder / f"{digest.hexdigest()[:32]}{cache.ENTRY_SUFFIX}"

    stored = _read_cache(cache_file) if cache_file is not None and cache_file.exists() else None
    if stored is not None:
        images, kept, bad = stored
    else:
        results = _decode_files(paths, size, num_workers, progress)
        bad = [(p, reason) for p, (_, reason) in zip(paths, results) if reason is not None]
        kept_list = [i for i, (_, reason) in enumerate(results) if reason is None]
        kept = torch.tensor(kept_list, dtype=torch.int64)
        images = _stack([paths[i] for i in kept_list], [results[i][0] for i in kept_list])
        if cache_file is not None:
            _write_cache(folder, cache_file, images, kept, bad)
    if cache_file is not None:
        _touch_and_prune(cache_file, root)

    if bad and not skip_bad_images:
        raise ValueError(
            _bad_files_message(bad) + "; fix or remove them, or skip them with data.skip_bad_images=true "
            "(skip_bad_images=True in Python)"
        )
    skipped = [path for path, _ in bad]
    if skipped:
        warnings.warn(f"skipped {_bad_files_message(bad)}", stacklevel=3)
    if len(kept) == 0:
        raise ValueError(f"no readable images under {str(root)!r}")
    kept_paths = [paths[i] for i in kept.tolist()]
    label_tensor = torch.tensor(labels, dtype=torch.int64)[kept]
    return ImageSet(images, label_tensor, classes, kept_paths, skipped)


def load_image_folder(
    root: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    skip_bad_images: bool = False,
    num_workers: int | None = None,
    progress: bool = True,
    size: tuple[int, int] | None = None,
    aspect: str = "squash",
    crop_fraction: float = 1.0,
    decode: bool = True,
) -> ImageSet:
    """Images in ``root/<class>/...*.jpg|jpeg|png|bmp|webp``, decoded once into a cached uint8 array.

    Classes are the sorted subfolder names (hidden folders ignored); files are found as ``list_image_folder``
    lists them (recursively, hidden files and folders skipped). Every image becomes RGB (greyscale
    copied to 3 channels, RGBA's alpha dropped). All images must share a size unless ``size=(H, W)``
    fits them to it: to ``size / crop_fraction`` with ``aspect`` handling (``trickbag.transforms.ASPECTS``:
    "squash" resizes both sides, "crop" the shorter one and centre-crops, "pad" letterboxes), then a centre crop
    of ``size``. The cache (``cache_dir``, default $TRICKBAG_CACHE_DIR, $XDG_CACHE_HOME/trickbag or
    ~/.cache/trickbag; see ``trickbag.cache``) is keyed by the absolute root and the sorted file list with sizes
    and mtimes, so editing any file re-decodes; nothing is written into ``root``.

    Args:
        skip_bad_images: False: an unreadable image is a ValueError naming it. True: skip it, warn, and
            list it in the result's ``skipped``.
        num_workers: decoding processes (None: one per CPU core; 0: decode in this process).
        progress: show a progress bar (only on a terminal).
        decode: False only lists the files: ``images`` is None (for ``trickbag.streaming``).

    Returns:
        ImageSet with images (N, 3, H, W) uint8 and absolute ``paths``.
    """
    fit = _make_fit(size, aspect, crop_fraction)
    root_path = Path(root).expanduser().resolve()
    paths, labels, classes = list_image_folder(root_path)
    return _decode_cached(
        paths,
        labels,
        classes,
        root=root_path,
        key_extra=f"folder {classes}",
        cache_dir=cache_dir,
        skip_bad_images=skip_bad_images,
        num_workers=num_workers,
        progress=progress,
        size=fit,
        decode=decode,
    )


def load_csv(
    csv_path: str | os.PathLike,
    *,
    root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    skip_bad_images: bool = False,
    num_workers: int | None = None,
    progress: bool = True,
    size: tuple[int, int] | None = None,
    aspect: str = "squash",
    crop_fraction: float = 1.0,
    decode: bool = True,
) -> ImageSet:
    """Images listed in a CSV with columns ``path,label``.

    Relative paths are relative to ``root`` if given, else to the CSV's folder. Labels are either all
    integers (label i -> classes[i] = "i", classes "0".."max") or names (classes sorted). Other arguments
    as ``load_image_folder`` (the same user cache folder).
    """
    csv_file = Path(csv_path).expanduser().resolve()
    if not csv_file.is_file():
        raise FileNotFoundError(f"CSV file {str(csv_path)!r} does not exist")
    base = Path(root).expanduser().resolve() if root is not None else csv_file.parent
    with open(csv_file, newline="") as handle:
        reader = csv.DictReader(handle)
        header = [name.strip() for name in reader.fieldnames or []]
        if "path" not in header or "label" not in header:
            raise ValueError(f"{csv_file}: needs a header with columns 'path' and 'label', got {header}")
        reader.fieldnames = header
        rows = [(reader.line_num, row["path"].strip(), (row["label"] or "").strip()) for row in reader]
    if not rows:
        raise ValueError(f"{csv_file}: no rows after the header")
    paths = []
    for line, path_text, label_text in rows:
        if not path_text or not label_text:
            raise ValueError(f"{csv_file} line {line}: empty path or label")
        path = Path(path_text).expanduser()
        path = path if path.is_absolute() else base / path
        if not path.is_file():
            raise FileNotFoundError(
                f"{csv_file} line {line}: image {path_text!r} not found (looked for {path})"
            )
        paths.append(str(path))
    label_texts = [label for _, _, label in rows]
    if all(text.lstrip("-").isdigit() for text in label_texts):
        numbers = [int(text) for text in label_texts]
        if min(numbers) < 0:
            line = rows[numbers.index(min(numbers))][0]
            raise ValueError(f"{csv_file} line {line}: integer labels must be >= 0, got {min(numbers)}")
        classes = [str(i) for i in range(max(numbers) + 1)]
        labels = numbers
    else:
        classes = sorted(set(label_texts))
        index = {name: i for i, name in enumerate(classes)}
        labels = [index[text] for text in label_texts]
    return _decode_cached(
        paths,
        labels,
        classes,
        root=base,
        key_extra=f"csv {classes}",
        cache_dir=cache_dir,
        skip_bad_images=skip_bad_images,
        num_workers=num_workers,
        progress=progress,
        size=_make_fit(size, aspect, crop_fraction),
        decode=decode,
    )
