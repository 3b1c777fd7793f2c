"""Saving and loading under OS failures: every file operation of a save fails in turn, a real full disk, a
read-only disk, a vanished folder. After each, the previous checkpoint still loads and verifies, the message
says what failed and which checkpoint is intact, and the next save succeeds."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile

import pytest
import torch

import trickbag.checkpoint as checkpoint_module
from trickbag.checkpoint import (
    CheckpointReadError,
    CheckpointWriteError,
    find_good_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

# The operations a save performs, patched where trickbag.checkpoint looks them up.
OPERATIONS = {
    "mkdtemp": (checkpoint_module.tempfile, "mkdtemp"),
    "write": (checkpoint_module, "_write_durably"),
    "fsync": (checkpoint_module.os, "fsync"),
    "chmod": (checkpoint_module.os, "chmod"),
    "rename": (checkpoint_module.os, "replace"),
    "symlink": (checkpoint_module.os, "symlink"),
    "rmtree": (checkpoint_module.shutil, "rmtree"),
}


def weights(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(16, 8, generator=generator), "b": torch.randn(16, generator=generator)}


def save(run_dir, epoch, **kwargs):
    return save_checkpoint(
        run_dir, "last", weights=weights(epoch), meta={"epoch": epoch}, state={"step": epoch}, **kwargs
    )


def patch_operations(monkeypatch, fail_at: int | None, exception: BaseException | None) -> list[str]:
    """Count every operation of OPERATIONS; the ``fail_at``-th raises ``exception``. Returns the call trace."""
    trace: list[str] = []
    for name, (owner, attribute) in OPERATIONS.items():
        real = getattr(owner, attribute)

        def wrapper(*args, _real=real, _name=name, **kwargs):
            trace.append(_name)
            if len(trace) == fail_at:
                raise exception
            return _real(*args, **kwargs)

        monkeypatch.setattr(owner, attribute, wrapper)
    return trace


def trace_of_one_save(run_dir, monkeypatch) -> list[str]:
    run_dir.mkdir()
    save(run_dir, 1)
    with monkeypatch.context() as patch:
        trace = patch_operations(patch, None, None)
        save(run_dir, 2)
    return trace


# temp folder; each file written then fsynced; the folder's mode and fsync; rename into place; pointer swap
# (symlink + rename); fsync of the run folder; the replaced folder renamed away and removed.
SAVE_TRACE = ["mkdtemp", "write", "fsync", "write", "fsync", "write", "fsync", "chmod", "fsync", "rename",
              "symlink", "rename", "fsync", "rename", "rmtree"]  # fmt: skip
POINTER_SWAPPED = (
    SAVE_TRACE.index("symlink") + 2
)  # the 1-based step from which the new checkpoint is in place


def test_trace_covers_every_file_operation(tmp_path, monkeypatch):
    assert trace_of_one_save(tmp_path / "probe", monkeypatch) == SAVE_TRACE


@pytest.mark.filterwarnings("ignore:could not delete the old checkpoint")
@pytest.mark.parametrize("failure", ["ENOSPC", "EACCES", "KeyboardInterrupt"])
def test_a_failure_at_each_operation_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failure):
    for fail_at in range(1, len(SAVE_TRACE) + 1):
        run_dir = tmp_path / f"run{fail_at}"
        run_dir.mkdir()
        save(run_dir, 1)
        if (
            failure == "KeyboardInterrupt"
        ):  # like a signal arriving mid-save: passed on as is, still cleaned up
            exception: BaseException = KeyboardInterrupt()
        else:
            code = getattr(errno, failure)
            exception = OSError(code, os.strerror(code), str(run_dir / "somefile"))
        with monkeypatch.context() as patch:
            patch_operations(patch, fail_at, exception)
            try:
                save(run_dir, 2)
                raised = None
            except BaseException as error:  # noqa: BLE001 - the test inspects whatever was raised
                raised = error
        swapped = fail_at > POINTER_SWAPPED
        expected_epoch = 2 if swapped else 1
        if fail_at > POINTER_SWAPPED + 1 and failure != "KeyboardInterrupt":
            assert raised is None, (fail_at, raised)  # removing the replaced folder only warns
        elif failure == "KeyboardInterrupt":
            assert type(raised) is KeyboardInterrupt, fail_at
        else:
            assert isinstance(raised, CheckpointWriteError) and raised.errno == getattr(errno, failure)
            assert f"failed: {os.strerror(raised.errno)} ({run_dir / 'somefile'})" in str(raised)
            if swapped:
                assert f"The new checkpoint {run_dir / 'last'} -> last-epoch002 is in place" in str(raised)
            else:
                assert f"{run_dir / 'last'} -> last-epoch001 is intact" in str(raised), str(raised)
            assert f"trickbag resume {run_dir}" in str(raised)
        found, problems = find_good_checkpoint(run_dir)
        assert problems == [] and found.name == f"last-epoch00{expected_epoch}", (fail_at, found, problems)
        loaded = load_checkpoint(run_dir / "last", default_kind="last")
        assert torch.equal(loaded.weights["w"], weights(expected_epoch)["w"])
        assert loaded.state == {"step": expected_epoch}
        leftovers = [p.name for p in run_dir.iterdir() if p.name.startswith(".")]
        assert leftovers == ([".last-last-epoch001.deleting.tmp"] if fail_at == len(SAVE_TRACE) else []), (
            fail_at
        )
        # The next save succeeds and leaves exactly one checkpoint.
        save(run_dir, 3)
        assert sorted(p.name for p in run_dir.iterdir()) == ["last", "last-epoch003"], fail_at


def test_enospc_message_states_the_size_needed(tmp_path, monkeypatch):
    save(tmp_path, 1)
    (tmp_path / "reference").mkdir()
    reference = save(tmp_path / "reference", 2)
    needed = sum(f.stat().st_size for f in reference.iterdir())
    monkeypatch.setattr(
        checkpoint_module,
        "_write_durably",
        lambda path, data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device", str(path))),
    )
    with pytest.raises(CheckpointWriteError) as caught:
        save(tmp_path, 2)
    message = str(caught.value)
    assert f"the checkpoint needs {needed / 1000:.1f} KB" in message, message
    assert "writing model.safetensors failed: No space left on device" in message
    assert f"{tmp_path / 'last'} -> last-epoch001 is intact" in message


def test_vanished_run_folder_is_a_clear_error(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save(run_dir, 1)
    shutil.rmtree(run_dir)
    with pytest.raises(
        CheckpointWriteError, match="creating a temp folder failed.*the folder vanished"
    ) as caught:
        save(run_dir, 2)
    assert caught.value.errno == errno.ENOENT and "No earlier 'last' checkpoint exists" in str(caught.value)


@pytest.mark.parametrize("verify", [True, False])
def test_read_failures_are_one_clear_error(tmp_path, monkeypatch, verify):
    save(tmp_path, 1)

    def refuse(path, *args, **kwargs):
        if os.path.basename(path) == "model.safetensors":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "open", refuse, raising=False)  # the hashing read
    monkeypatch.setattr(checkpoint_module, "load_file", lambda path: refuse(path))  # safetensors' own read
    with pytest.raises(
        CheckpointReadError, match="model.safetensors: Permission denied; no permission"
    ) as caught:
        load_checkpoint(tmp_path / "last", verify=verify)
    assert isinstance(caught.value, OSError) and caught.value.errno == errno.EACCES


def test_state_read_failure_is_one_clear_error(tmp_path, monkeypatch):
    save(tmp_path, 1)
    (tmp_path / "last" / "state.pt").unlink()
    (tmp_path / "last" / "state.pt").mkdir()  # reading a folder: IsADirectoryError, an OS-level failure
    with pytest.raises(CheckpointReadError, match="state.pt: Is a directory") as caught:
        load_checkpoint(tmp_path / "last")
    assert caught.value.errno == errno.EISDIR


# ------------------------------------------------------------------------------------- a real tiny file system


@pytest.fixture
def tiny_tmpfs():
    """A 1 MiB tmpfs (needs root and mount permission: CI runs as root; skipped where mounting is refused)."""
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = tempfile.mkdtemp(prefix="trickbag-tmpfs-")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mount_point], capture_output=True, text=True
    )
    if result.returncode != 0:
        os.rmdir(mount_point)
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", mount_point], check=False)
        os.rmdir(mount_point)


def test_real_full_disk_and_read_only_disk(tiny_tmpfs):
    from pathlib import Path

    run_dir = Path(tiny_tmpfs)
    save(run_dir, 1)
    big = {"w": torch.zeros(400_000)}  # 1.6 MB: more than the whole disk
    with pytest.raises(CheckpointWriteError) as caught:
        save_checkpoint(run_dir, "last", weights=big, meta={"epoch": 2})
    assert caught.value.errno == errno.ENOSPC
    assert "No space left on device" in str(caught.value) and "the checkpoint needs 1.6 MB" in str(
        caught.value
    )
    assert f"{run_dir / 'last'} -> last-epoch001 is intact" in str(caught.value)
    assert sorted(p.name for p in run_dir.iterdir()) == ["last", "last-epoch001"]  # temp folder removed
    assert torch.equal(load_checkpoint(run_dir / "last").weights["w"], weights(1)["w"])
    save(run_dir, 2)  # space was freed by the failed save: the next one fits
    subprocess.run(["mount", "-o", "remount,ro", str(run_dir)], check=True)
    with pytest.raises(
        CheckpointWriteError, match="read-only: set output_dir to a writable folder"
    ) as caught:
        save(run_dir, 3)
    assert caught.value.errno == errno.EROFS
    assert torch.equal(load_checkpoint(run_dir / "last").weights["w"], weights(2)["w"])
