from __future__ import annotations

import hashlib
import json
import os
import pickle
import random

import numpy as np
import pytest
import torch
from torch import nn

import trickbag.checkpoint as checkpoint_module
from trickbag.checkpoint import (
    CheckpointCorruptError,
    Checkpointer,
    atomic_write_bytes,
    capture_rng_state,
    checkpoint_folders,
    checkpoint_name,
    find_good_checkpoint,
    load_checkpoint,
    resolve_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(4, 3, generator=generator),
        "layer.bias": torch.randn(4, generator=generator).to(torch.bfloat16),
        "bn.num_batches_tracked": torch.tensor(7),
    }


def test_checkpoint_name():
    assert checkpoint_name("best_metric", 7, "macro_f1", 0.97314) == "best_metric-epoch007-macro_f1=0.9731"
    assert checkpoint_name("last", 10) == "last-epoch010"
    with pytest.raises(ValueError, match="kind='best' not in"):
        checkpoint_name("best", 1)


def test_round_trip_and_pointer(tmp_path):
    state = {
        "optimizer": {"state": {0: {"momentum_buffer": torch.ones(3)}}, "param_groups": [{"lr": 0.1}]},
        "n": 3,
    }
    folder = save_checkpoint(
        tmp_path,
        "best_loss",
        weights=weights(),
        meta={"epoch": 2, "classes": ["a"]},
        state=state,
        value_name="val_loss",
        value=0.5,
    )
    assert folder.name == "best_loss-epoch002-val_loss=0.5000"
    assert os.readlink(tmp_path / "best_loss") == folder.name
    loaded = load_checkpoint(tmp_path / "best_loss")
    for key, tensor in weights().items():
        assert torch.equal(loaded.weights[key], tensor) and loaded.weights[key].dtype == tensor.dtype
    assert torch.equal(loaded.state["optimizer"]["state"][0]["momentum_buffer"], torch.ones(3))
    assert loaded.state["n"] == 3
    assert (
        loaded.meta["epoch"] == 2 and loaded.meta["kind"] == "best_loss" and "trickbag_version" in loaded.meta
    )
    # A run folder resolves to its best_metric by default, or the kind asked for.
    with pytest.raises(FileNotFoundError, match="'best_metric' checkpoint"):
        resolve_checkpoint(tmp_path)
    assert resolve_checkpoint(tmp_path, "best_loss") == folder.resolve()


def test_new_save_replaces_pointer_then_deletes_previous(tmp_path):
    first = save_checkpoint(tmp_path, "last", weights=weights(0), meta={"epoch": 1})
    second = save_checkpoint(tmp_path, "last", weights=weights(1), meta={"epoch": 2})
    assert not first.exists() and second.exists()
    assert os.readlink(tmp_path / "last") == "last-epoch002"
    assert torch.equal(load_checkpoint(tmp_path / "last").weights["layer.weight"], weights(1)["layer.weight"])
    # Saving the same epoch again (a resumed run repeating an epoch) never deletes what the pointer names first.
    third = save_checkpoint(tmp_path, "last", weights=weights(2), meta={"epoch": 2})
    assert third.name == "last-epoch002-1" and not second.exists()
    assert torch.equal(load_checkpoint(tmp_path / "last").weights["layer.weight"], weights(2)["layer.weight"])


def test_crash_while_saving_keeps_previous(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, "last", weights=weights(0), meta={"epoch": 1})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, "last", weights=weights(1), meta={"epoch": 2}, state={"x": 1})
    monkeypatch.undo()
    assert os.readlink(tmp_path / "last") == "last-epoch001"
    assert torch.equal(load_checkpoint(tmp_path / "last").weights["layer.weight"], weights(0)["layer.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last", "last-epoch001"]  # no temp folder left


def test_crash_before_pointer_swap_keeps_previous(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, "last", weights=weights(0), meta={"epoch": 1})
    monkeypatch.setattr(
        checkpoint_module, "_point", lambda link, name: (_ for _ in ()).throw(OSError("killed"))
    )
    with pytest.raises(OSError, match="killed"):
        save_checkpoint(tmp_path, "last", weights=weights(1), meta={"epoch": 2})
    assert torch.equal(load_checkpoint(tmp_path / "last").weights["layer.weight"], weights(0)["layer.weight"])


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = "/nonexistent"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_without_running(tmp_path, writer):
    global MARKER
    marker = tmp_path / "pwned"
    MARKER = str(marker)
    folder = save_checkpoint(tmp_path, "last", weights=weights(), meta={"epoch": 1}, state={"ok": 1})
    if writer == "torch.save":
        torch.save({"evil": Payload()}, folder / "state.pt")
    else:
        with open(folder / "state.pt", "wb") as handle:
            pickle.dump({"evil": Payload()}, handle)
    # The checksum catches the swapped file first; without it, weights_only still refuses to run the payload.
    with pytest.raises(CheckpointCorruptError, match="state.pt: checksum mismatch"):
        load_checkpoint(tmp_path / "last")
    with pytest.raises(ValueError, match="refused to load training state"):
        load_checkpoint(tmp_path / "last", verify=False)
    assert not marker.exists()
    # without the state the weights (safetensors) still load
    assert load_checkpoint(tmp_path / "last", with_state=False).state == {}


def test_corrupt_files_give_clear_errors(tmp_path):
    folder = save_checkpoint(tmp_path, "best_metric", weights=weights(), meta={"epoch": 1})
    (folder / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointCorruptError, match="model.safetensors: checksum mismatch"):
        load_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_checkpoint(tmp_path, verify=False)
    (folder / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="meta.json: not valid JSON"):
        load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(ValueError, match="meta must contain 'epoch'"):
        save_checkpoint(tmp_path, "last", weights=weights(), meta={})


def test_rng_state_round_trip_is_weights_only_loadable(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    state = capture_rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    path = tmp_path / "rng.pt"
    torch.save(state, path)
    restore_rng_state(torch.load(path, weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_atomic_write_bytes(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write_bytes(path, b"one")
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_checkpointer_stores_confusion_matrix(tmp_path):
    class FakeMetrics:
        def confusion_matrix(self):
            return torch.tensor([[2, 1], [0, 3]])

    model = nn.Linear(3, 2)
    saver = Checkpointer(tmp_path, {"classes": ["a", "b"]})
    saver.save(
        "best_metric",
        model,
        epoch=3,
        value_name="accuracy",
        value=0.8,
        scores={"accuracy": 0.8},
        metrics=FakeMetrics(),
    )
    meta = json.loads((tmp_path / "best_metric" / "meta.json").read_text())
    assert meta["confusion_matrix"] == [[2, 1], [0, 3]] and meta["classes"] == ["a", "b"]
    assert saver.latest("best_metric").name == "best_metric-epoch003-accuracy=0.8000"
    assert saver.latest("last") is None


def test_stale_temp_folder_from_a_killed_save_is_removed(tmp_path):
    (tmp_path / ".last-abc.tmp").mkdir()
    (tmp_path / ".last-abc.tmp" / "model.safetensors").write_bytes(b"half written")
    save_checkpoint(tmp_path, "last", weights=weights(), meta={"epoch": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last", "last-epoch001"]


# ---------------------------------------------------------------------------------------------------- checksums


def flip_bit(path, offset_from_end=3):
    """Flip one bit near the end of a file (inside the tensor data, so safetensors' header still parses)."""
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x10
    path.write_bytes(bytes(data))


def test_meta_records_the_sha256_and_size_of_each_file(tmp_path):
    folder = save_checkpoint(
        tmp_path, "last", weights=weights(), meta={"epoch": 1}, state={"x": torch.ones(2)}
    )
    meta = json.loads((folder / "meta.json").read_text())
    for name in ("model.safetensors", "state.pt"):
        data = (folder / name).read_bytes()
        assert meta["files"][name] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    # meta_sha256 is the hash of meta.json's content without that key, as canonical JSON
    stored = meta.pop("meta_sha256")
    canonical = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    assert stored == hashlib.sha256(canonical).hexdigest()
    with pytest.raises(ValueError, match="reserved for the checksums"):
        save_checkpoint(tmp_path, "last", weights=weights(), meta={"epoch": 1, "files": {}})


def test_flipped_bit_in_weights_is_caught_naming_file_and_hashes(tmp_path):
    folder = save_checkpoint(tmp_path, "best_metric", weights=weights(), meta={"epoch": 1})
    expected = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    flip_bit(folder / "model.safetensors")
    actual = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    with pytest.raises(CheckpointCorruptError, match="model.safetensors: checksum mismatch") as caught:
        load_checkpoint(tmp_path)
    assert caught.value.expected == expected and caught.value.actual == actual
    assert caught.value.path == folder.resolve() / "model.safetensors"
    assert expected in str(caught.value) and actual in str(caught.value)
    # Without verification the flip loads silently with other values: the checksum is what catches it.
    unverified = load_checkpoint(tmp_path, verify=False)
    assert not all(torch.equal(unverified.weights[k], v) for k, v in weights().items())


def test_flipped_bit_in_state_is_caught_unless_state_is_skipped(tmp_path):
    folder = save_checkpoint(
        tmp_path, "last", weights=weights(), meta={"epoch": 1}, state={"x": torch.ones(64)}
    )
    flip_bit(folder / "state.pt", offset_from_end=300)
    with pytest.raises(CheckpointCorruptError, match="state.pt: checksum mismatch"):
        load_checkpoint(tmp_path / "last")
    assert load_checkpoint(tmp_path / "last", with_state=False).state == {}


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(epoch=2), "meta.json: checksum mismatch"),  # still valid JSON, one value changed
        (lambda m: m.pop("meta_sha256"), r"required keys missing: \['meta_sha256'\]"),
        (lambda m: m.update(fil3s=m.pop("files")), r"required keys missing: \['files'\]"),
        (lambda m: m.pop("kind"), r"required keys missing: \['kind'\]"),
    ],
)
def test_edited_meta_is_caught(tmp_path, edit, message):
    folder = save_checkpoint(tmp_path, "last", weights=weights(), meta={"epoch": 1})
    meta = json.loads((folder / "meta.json").read_text())
    edit(meta)
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointCorruptError, match=message):
        load_checkpoint(tmp_path / "last")


def test_checkpoint_without_checksums_still_loads(tmp_path):
    """The layout written before checksums existed: loaded as before, unverified."""
    from safetensors.torch import save_file

    folder = tmp_path / "last-epoch001"
    folder.mkdir()
    save_file(weights(), str(folder / "model.safetensors"))
    torch.save({"n": 3}, folder / "state.pt")
    (folder / "meta.json").write_text(json.dumps({"kind": "last", "epoch": 1, "trickbag_version": "0.1.0"}))
    loaded = load_checkpoint(folder)
    assert torch.equal(loaded.weights["layer.weight"], weights()["layer.weight"]) and loaded.state == {"n": 3}


def test_keep_two_and_checkpoint_folders_order(tmp_path):
    for epoch in (1, 2, 3):
        save_checkpoint(tmp_path, "last", weights=weights(epoch), meta={"epoch": epoch}, keep=2)
    save_checkpoint(tmp_path, "last", weights=weights(4), meta={"epoch": 3}, keep=2)  # epoch 3 again
    names = [p.name for p in checkpoint_folders(tmp_path, "last")]
    assert names == ["last-epoch003-1", "last-epoch003"]
    assert os.readlink(tmp_path / "last") == "last-epoch003-1"
    with pytest.raises(ValueError, match="keep must be an int >= 1"):
        save_checkpoint(tmp_path, "last", weights=weights(), meta={"epoch": 1}, keep=0)


def test_find_good_checkpoint_falls_back_newest_first(tmp_path):
    save_checkpoint(
        tmp_path, "best_metric", weights=weights(10), meta={"epoch": 1}, value_name="acc", value=0.5
    )
    for epoch in (1, 2):
        save_checkpoint(tmp_path, "last", weights=weights(epoch), meta={"epoch": epoch}, keep=2)
    assert find_good_checkpoint(tmp_path) == ((tmp_path / "last-epoch002").resolve(), [])
    flip_bit(tmp_path / "last-epoch002" / "model.safetensors")
    found, problems = find_good_checkpoint(tmp_path)
    assert found == (tmp_path / "last-epoch001").resolve()
    assert len(problems) == 1 and "last-epoch002" in problems[0] and "checksum mismatch" in problems[0]
    (tmp_path / "last-epoch001" / "meta.json").write_text("{")
    found, problems = find_good_checkpoint(tmp_path)
    assert found == (tmp_path / "best_metric-epoch001-acc=0.5000").resolve() and len(problems) == 2
    assert torch.equal(load_checkpoint(found).weights["layer.weight"], weights(10)["layer.weight"])
    flip_bit(found / "model.safetensors")
    assert find_good_checkpoint(tmp_path)[0] is None
    # A pointer whose folder vanished is reported too.
    empty = tmp_path / "other"
    empty.mkdir()
    os.symlink("last-epoch009", empty / "last")
    found, problems = find_good_checkpoint(empty)
    assert found is None and problems == [f"{empty / 'last'}: points at last-epoch009, which does not exist"]
