"""trickbag.streaming: the same batches as the in-memory BatchLoader, any worker count, exact mid-epoch resume."""

from __future__ import annotations

import gc
import inspect
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trickbag import decode, streaming
from trickbag.data import BatchLoader
from trickbag.images import list_image_folder, load_image_folder
from trickbag.prefetch import ThreadAhead
from trickbag.streaming import StreamingLoader

MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
needs_simplejpeg = pytest.mark.skipif(
    decode.choose_decoder("auto") != "simplejpeg", reason="simplejpeg not installed"
)
# (H, W), PIL mode, format: phone-, web- and scanner-like files in one folder.
KINDS = [
    ((40, 30), "RGB", "JPEG"),
    ((24, 48), "L", "PNG"),
    ((33, 33), "RGBA", "PNG"),
    ((50, 64), "RGB", "PNG"),
]


def write_mixed_folder(root: Path, per_class: int = 7) -> None:
    rng = np.random.default_rng(0)
    for label in ("cat", "dog", "eel"):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            (height, width), mode, fmt = KINDS[i % len(KINDS)]
            array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            suffix = "jpg" if fmt == "JPEG" else "png"
            Image.fromarray(array).convert(mode).save(root / label / f"{i}.{suffix}", format=fmt)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    write_mixed_folder(root)
    return root


def batches(loader, epochs=2):
    out = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        out += [(x.clone(), None if y is None else y.clone()) for x, y in loader]
    return out


def assert_same(first, second):
    assert len(first) == len(second) > 0
    for (x1, y1), (x2, y2) in zip(first, second):
        assert torch.equal(x1, x2)
        assert (y1 is None and y2 is None) or torch.equal(y1, y2)


@pytest.mark.parametrize("padding_mode", ["reflect", "zeros"])
def test_same_batches_as_in_memory_for_the_same_pipeline(folder, tmp_path, padding_mode):
    """Mixed sizes and formats fitted to 16x16 (crop aspect, 0.8 centre crop), pad-crop + flip: bit-identical."""
    fit = {"size": (16, 16), "aspect": "crop", "crop_fraction": 0.8}
    memory = load_image_folder(folder, cache_dir=tmp_path, num_workers=0, progress=False, **fit)
    options = {"batch_size": 5, "shuffle": True, "drop_last": True, "seed": 7, "mean": MEAN, "std": STD,
               "crop_padding": 3, "flip": True, "padding_mode": padding_mode}  # fmt: skip
    in_memory = BatchLoader(memory.images, memory.labels, **options)
    streamed = StreamingLoader(memory.paths, memory.labels, image_size=16, aspect="crop", crop_fraction=0.8,
                               num_workers=2, **options)  # fmt: skip
    assert len(streamed) == len(in_memory) == 4
    assert_same(batches(streamed), batches(in_memory))
    # For a CPU device the workers finish the batches; for CUDA the main process does, on the device: that path
    # too, forced here on the CPU.
    on_device = StreamingLoader(memory.paths, memory.labels, image_size=16, aspect="crop", crop_fraction=0.8,
                                num_workers=0, **options)  # fmt: skip
    assert on_device._settings["finish_in_worker"]
    on_device._settings["finish_in_worker"] = False
    assert_same(batches(on_device), batches(in_memory))
    # Evaluation: every image once, in order, no augmentation.
    eval_memory = BatchLoader.for_eval(memory.images, memory.labels, batch_size=8, mean=MEAN, std=STD)
    eval_streamed = StreamingLoader(memory.paths, memory.labels, image_size=16, aspect="crop", crop_fraction=0.8,
                                    batch_size=8, shuffle=False, mean=MEAN, std=STD)  # fmt: skip
    assert_same(batches(eval_streamed, 1), batches(eval_memory, 1))


def test_alternate_flip_same_batches_as_in_memory(folder, tmp_path):
    fit = {"size": (16, 16), "aspect": "crop", "crop_fraction": 1.0}
    memory = load_image_folder(folder, cache_dir=tmp_path, num_workers=0, progress=False, **fit)
    options = {"batch_size": 5, "shuffle": True, "seed": 3, "mean": MEAN, "std": STD, "crop_padding": 2,
               "flip": "alternate"}  # fmt: skip
    in_memory = BatchLoader(memory.images, memory.labels, **options)
    streamed = StreamingLoader(
        memory.paths, memory.labels, image_size=16, aspect="crop", num_workers=0, **options
    )
    assert_same(batches(streamed), batches(in_memory))
    with pytest.raises(ValueError, match="flip must be true, false or 'alternate'"):
        StreamingLoader(memory.paths, memory.labels, image_size=16, **{**options, "flip": "yes"})


def test_random_resized_crops_do_not_depend_on_workers(folder):
    paths, labels, _ = list_image_folder(folder)
    options = {"image_size": 12, "batch_size": 4, "shuffle": True, "seed": 3, "mean": MEAN, "std": STD,
               "random_resized_crop": True, "flip": True, "scale": (0.3, 1.0)}  # fmt: skip
    serial = batches(StreamingLoader(paths, torch.tensor(labels), num_workers=0, **options))
    parallel = batches(StreamingLoader(paths, torch.tensor(labels), num_workers=2, **options))
    assert_same(serial, parallel)
    assert serial[0][0].shape == (4, 3, 12, 12)
    # Each epoch is a permutation of the data, and epochs differ.
    per_epoch = len(StreamingLoader(paths, torch.tensor(labels), **options))
    first = torch.cat([y for _, y in serial[:per_epoch]])
    assert sorted(first.tolist()) == sorted(labels)
    assert not torch.equal(serial[0][0], serial[per_epoch][0])
    other_seed = batches(
        StreamingLoader(paths, torch.tensor(labels), num_workers=0, **{**options, "seed": 4}), 1
    )
    assert not torch.equal(other_seed[0][0], serial[0][0])


@pytest.mark.parametrize("decoder", ["pil", pytest.param("simplejpeg", marks=needs_simplejpeg)])
def test_each_image_is_its_random_resized_crop(folder, decoder):
    """Un-normalised, batch item k is transforms.resized_crop of file order[k] with plan row k (flipped or not)."""
    from trickbag import transforms

    paths, labels, _ = list_image_folder(folder)
    loader = StreamingLoader(paths, torch.tensor(labels), image_size=10, batch_size=21, shuffle=True, seed=5,
                             mean=[0.0] * 3, std=[1 / 255] * 3, random_resized_crop=True, flip=True,
                             decoder=decoder)  # fmt: skip
    assert loader.decoder == decoder
    ((x, y),) = batches(loader, 1)
    plan = loader.epoch_plan(0)
    for k in range(len(x)):
        i = int(plan.order[k])
        expected = transforms.resized_crop(
            paths[i], plan.crops[k], (10, 10), (0.08, 1.0), (3 / 4, 4 / 3), decoder=decoder
        )
        if plan.flips[k]:
            expected = expected[:, ::-1]
        assert torch.equal(x[k].round().to(torch.uint8), torch.from_numpy(expected.copy()).permute(2, 0, 1))
        assert y[k] == labels[i]


def test_decoder_is_resolved_once_and_checked(folder):
    paths, labels, _ = list_image_folder(folder)
    options = {"image_size": 8, "batch_size": 4, "shuffle": False, "mean": MEAN, "std": STD}
    assert StreamingLoader(paths, None, **options).decoder == decode.choose_decoder("auto")
    with pytest.raises(ValueError, match="decoder"):
        StreamingLoader(paths, None, decoder="libjpeg", **options)


@pytest.mark.parametrize("drop_last", [True, False])
def test_ranks_shard_like_batch_loader(folder, tmp_path, drop_last):
    memory = load_image_folder(folder, cache_dir=tmp_path, num_workers=0, progress=False, size=(8, 8))
    options = {"batch_size": 3, "shuffle": True, "drop_last": drop_last, "seed": 1, "mean": MEAN, "std": STD,
               "flip": True}  # fmt: skip
    whole = batches(StreamingLoader(memory.paths, memory.labels, image_size=8, aspect="squash", **options), 1)
    ranks = [batches(StreamingLoader(memory.paths, memory.labels, image_size=8, aspect="squash", rank=r,
                                     world_size=2, **options), 1) for r in range(2)]  # fmt: skip
    # Positions r::2 of the one-process epoch, in order.
    x_whole = torch.cat([x for x, _ in whole])
    stop = (len(x_whole) // 6) * 6 if drop_last else len(x_whole)
    for r in range(2):
        assert torch.equal(torch.cat([x for x, _ in ranks[r]]), x_whole[r:stop:2])
    if "world_size" in inspect.signature(BatchLoader).parameters:  # BatchLoader's sharding, once it has one
        for r in range(2):
            in_memory = BatchLoader(memory.images, memory.labels, rank=r, world_size=2, **options)
            assert_same(ranks[r], batches(in_memory, 1))


RESUME_SCRIPT = """
import sys, torch
from trickbag.images import list_image_folder
from trickbag.streaming import StreamingLoader
folder, out, state_file, slow = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
paths, labels, _ = list_image_folder(folder)
loader = StreamingLoader(paths, torch.tensor(labels), image_size=12, batch_size=2, shuffle=True, seed=11,
                         mean=[0.5] * 3, std=[0.25] * 3, random_resized_crop=True, flip=True, num_workers=2)
try:
    loader.load_state_dict(torch.load(state_file, weights_only=True))
except FileNotFoundError:
    pass
import os, time
while loader.epoch < 2:
    loader.set_epoch(loader.epoch)
    for x, y in loader:
        state = loader.state_dict()
        torch.save({"epoch": state["epoch"], "batch": state["batch"], "x": x, "y": y},
                   f"{out}/{state['epoch']}-{state['batch']:03d}.pt")
        torch.save(state, state_file + ".tmp")
        os.replace(state_file + ".tmp", state_file)  # what a checkpoint would hold after this batch
        time.sleep(slow)
"""


def run_resume_script(folder, out, state, slow):
    script = out.parent / "resume.py"
    script.write_text(RESUME_SCRIPT)
    # stderr to a file: a failing run's message shows in the assertion (a pipe could fill and block it)
    errors = open(out.parent / f"{out.name}-stderr.txt", "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, str(script), str(folder), str(out), str(state), str(slow)],
                            start_new_session=True, stderr=errors)  # fmt: skip


def finished(process, out) -> bool:
    """Wait for a resume script; on failure, fail with its exit code and the end of its stderr."""
    code = process.wait(120)
    assert code == 0, f"exit {code}: " + (out.parent / f"{out.name}-stderr.txt").read_text()[-3000:]
    return True


def test_kill_9_mid_epoch_and_resume_is_bit_identical(folder, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    straight.mkdir()
    resumed.mkdir()
    assert finished(run_resume_script(folder, straight, tmp_path / "s1.pt", 0.0), straight)
    process = run_resume_script(folder, resumed, tmp_path / "s2.pt", 0.05)
    deadline = time.time() + 60
    while len(list(resumed.glob("0-*.pt"))) < 4 and time.time() < deadline:  # a few batches into epoch 0
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # the loader's workers die with it
    process.wait()
    done = len(list(resumed.glob("*.pt")))
    assert 4 <= done < len(list(straight.glob("*.pt")))  # killed mid-run
    assert finished(run_resume_script(folder, resumed, tmp_path / "s2.pt", 0.0), resumed)
    names = sorted(p.name for p in straight.glob("*.pt"))
    assert names == sorted(p.name for p in resumed.glob("*.pt"))
    for name in names:
        a, b = torch.load(straight / name, weights_only=True), torch.load(resumed / name, weights_only=True)
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"]), name


def test_state_dict_counts_batches_and_set_epoch_keeps_a_resume(folder):
    paths, labels, _ = list_image_folder(folder)
    make = lambda: StreamingLoader(paths, torch.tensor(labels), image_size=8, batch_size=4, shuffle=True,  # noqa: E731
                                   seed=2, mean=MEAN, std=STD, flip=True)  # fmt: skip
    loader = make()
    everything = batches(loader, 1)
    assert loader.state_dict() == {"seed": 2, "epoch": 1, "batch": 0}
    other = make()
    other.load_state_dict({"seed": 2, "epoch": 0, "batch": 3})
    other.set_epoch(0)  # what fit() does at the epoch start: the resume position is kept
    rest = [(x, y) for x, y in other]
    assert_same(rest, everything[3:])
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict({"seed": 3, "epoch": 0, "batch": 0})


def test_prediction_batches_without_labels_and_bad_files_named(folder, tmp_path):
    paths, _, _ = list_image_folder(folder)
    loader = StreamingLoader(paths[:5], None, image_size=8, batch_size=4, shuffle=False, mean=MEAN, std=STD)
    out = batches(loader, 1)
    assert [x.shape[0] for x, _ in out] == [4, 1] and out[0][1] is None
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    loader = StreamingLoader([paths[0], str(broken)], None, image_size=8, batch_size=2, shuffle=False,
                             mean=MEAN, std=STD)  # fmt: skip
    with pytest.raises(ValueError, match="broken.jpg"):
        batches(loader, 1)


@pytest.mark.parametrize(
    ("options", "match"),
    [({"image_size": 0}, "image_size"), ({"batch_size": 0}, "batch_size"), ({"rank": 2, "world_size": 2}, "rank"),
     ({"aspect": "stretch"}, "aspect"), ({"random_resized_crop": True, "crop_padding": 2}, "two crops"),
     ({"random_resized_crop": True, "scale": (0.5, 0.1)}, "scale"), ({"std": [0.0, 1.0, 1.0]}, "std")],
)  # fmt: skip
def test_bad_arguments_are_named(options, match):
    base = {"image_size": 8, "batch_size": 2, "shuffle": False, "mean": MEAN, "std": STD}
    with pytest.raises(ValueError, match=match):
        StreamingLoader(["a.jpg"], None, **{**base, **options})


def test_choose_streaming_by_budget():
    assert streaming.decoded_bytes(1000, 32) == 1000 * 3 * 32 * 32
    budget_gb = 3 * 32 * 32 * 1000 / 1e9
    assert not streaming.choose_streaming("auto", 1000, 32, budget_gb)  # exactly at the budget: fits
    assert streaming.choose_streaming("auto", 1001, 32, budget_gb)
    assert streaming.choose_streaming(False, 1, 1, None) and not streaming.choose_streaming(
        True, 10**9, 224, 1.0
    )
    assert streaming.memory_budget_bytes(None) > 0
    with pytest.raises(ValueError, match="in_memory"):
        streaming.choose_streaming("yes", 1, 1, None)


def passes(loader):
    """Epoch 0; epoch 1 broken off after 2 batches, then whole; a jump to epoch 3; a resume at (2, batch 1)."""
    out = batches(loader, 1)
    loader.set_epoch(1)
    out += [(x.clone(), y.clone()) for _, (x, y) in zip(range(2), loader)]
    out += batches_of(loader, 1) + batches_of(loader, 3)
    loader.load_state_dict({"seed": loader.seed, "epoch": 2, "batch": 1})
    return out + batches_of(loader, 2) + batches_of(loader, 3)


def batches_of(loader, epoch):
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def test_next_epoch_prefetch_gives_the_same_batches_and_runs_ahead(folder, monkeypatch):
    """The workers' queue running on into the next epoch changes no batch, whatever the trainer does next."""
    paths, labels, _ = list_image_folder(folder)
    options = {"image_size": 8, "batch_size": 4, "shuffle": True, "seed": 9, "mean": MEAN, "std": STD,
               "random_resized_crop": True, "flip": True}  # fmt: skip
    requested = []  # the items the DataLoader asked the sampler for, in order
    items = streaming._Batches.__iter__

    def recording(self):
        for item in items(self):
            requested.append(item)
            yield item

    monkeypatch.setattr(streaming._Batches, "__iter__", recording)
    ahead = StreamingLoader(paths, torch.tensor(labels), num_workers=2, prefetch_factor=2, **options)
    restarted = StreamingLoader(paths, torch.tensor(labels), prefetch_next_epoch=False, **options)
    assert len(ahead) == 6
    first = batches(ahead, 1)
    # 2 workers x 2 batches in flight: the first 4 batches of epoch 1 were handed out before epoch 0 ended (under
    # load, the DataLoader may already have asked for a fifth by the time the last batch of epoch 0 is returned).
    assert requested[6:10] == [(1, k) for k in range(4)] and requested[10:] in ([], [(1, 4)])
    assert_same(first, batches(restarted, 1))
    ahead.set_epoch(0)
    restarted.set_epoch(0)
    assert_same(passes(ahead), passes(restarted))
    # Each pass at an epoch's start right after the previous one continued the queue: no restart (which would
    # ask for the pass's first item again).
    continued = StreamingLoader(paths, torch.tensor(labels), num_workers=2, prefetch_factor=2, **options)
    requested.clear()
    batches(continued, 3)
    assert requested[:18] == [(e, k) for e in range(3) for k in range(6)]


# ---------------------------------------------------------------------------------------------------------
# The thread that receives and finishes batches ahead of the trainer (lookahead)
# ---------------------------------------------------------------------------------------------------------


def ahead_threads():
    return [t for t in threading.enumerate() if t.name == "trickbag-ahead" and t.is_alive()]


def wait_for_no_ahead_thread(timeout=10.0):
    deadline = time.time() + timeout
    while ahead_threads() and time.time() < deadline:
        gc.collect()
        time.sleep(0.05)
    return ahead_threads()


RRC = {"image_size": 8, "batch_size": 4, "shuffle": True, "seed": 9, "mean": MEAN, "std": STD,
       "random_resized_crop": True, "flip": True}  # fmt: skip


def test_thread_ahead_gives_the_batches_of_the_trainers_own_calls(folder):
    """lookahead=2 (a thread finishing batches ahead) vs lookahead=0 (finished on the trainer's next()): the same
    batches through broken-off passes, epoch jumps and a resume; the pad-crop pipeline finished in the thread too."""
    paths, labels, _ = list_image_folder(folder)
    ahead = StreamingLoader(paths, torch.tensor(labels), num_workers=2, lookahead=2, **RRC)
    inline = StreamingLoader(paths, torch.tensor(labels), num_workers=2, lookahead=0, **RRC)
    assert ahead.num_workers == 2
    iterator = iter(ahead)
    next(iterator)
    assert isinstance(ahead._ahead, ThreadAhead) and ahead_threads()
    iterator.close()  # broken off: its thread is stopped, not left holding batches
    assert ahead._ahead is None and not wait_for_no_ahead_thread()
    assert_same(passes(ahead), passes(inline))
    pad = {**RRC, "random_resized_crop": False, "crop_padding": 2}
    finished_here = [
        StreamingLoader(paths, torch.tensor(labels), num_workers=2, lookahead=k, **pad) for k in (2, 0)
    ]
    for loader in finished_here:
        loader._settings["finish_in_worker"] = False  # what a CUDA device does, forced on the CPU
    assert_same(batches(finished_here[0]), batches(finished_here[1]))


def test_thread_ahead_resume_counts_the_batches_the_trainer_received(folder):
    paths, labels, _ = list_image_folder(folder)
    everything = batches(StreamingLoader(paths, torch.tensor(labels), num_workers=0, **RRC), 1)
    loader = StreamingLoader(paths, torch.tensor(labels), num_workers=2, lookahead=3, **RRC)
    iterator = iter(loader)
    for _ in range(2):
        next(iterator)
    time.sleep(0.5)  # the thread has finished more batches by now
    assert loader.state_dict() == {"seed": 9, "epoch": 0, "batch": 2}
    iterator.close()
    resumed = StreamingLoader(paths, torch.tensor(labels), num_workers=2, lookahead=3, **RRC)
    resumed.load_state_dict(loader.state_dict())
    assert_same([(x, y) for x, y in resumed], everything[2:])


def test_thread_ahead_reraises_a_worker_error_and_stops(folder, tmp_path):
    paths, _, _ = list_image_folder(folder)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    loader = StreamingLoader([paths[0], paths[1], str(broken), paths[2]], None, image_size=8, batch_size=2,
                             shuffle=False, mean=MEAN, std=STD, num_workers=2, lookahead=2)  # fmt: skip
    received = []
    with pytest.raises(ValueError, match="broken.jpg"):
        for x, _ in loader:
            received.append(x)
    assert len(received) == 1  # the batch before the bad one was delivered first
    assert loader._ahead is None and not wait_for_no_ahead_thread()


def test_no_thread_or_worker_outlives_the_loader(folder):
    paths, labels, _ = list_image_folder(folder)
    loader = StreamingLoader(paths, torch.tensor(labels), num_workers=2, lookahead=2, **RRC)
    batches(loader, 1)  # a whole pass: the thread runs on into epoch 1, as the workers do
    assert ahead_threads()
    del loader  # collected: its thread is told to stop
    assert not wait_for_no_ahead_thread()
    loader = StreamingLoader(paths, torch.tensor(labels), num_workers=2, lookahead=2, **RRC)
    iterator = iter(loader)
    next(iterator)  # a pass left open, never closed
    workers = loader._loader._iterator._workers
    del loader, iterator
    assert not wait_for_no_ahead_thread()
    deadline = time.time() + 10
    while any(w.is_alive() for w in workers) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(w.is_alive() for w in workers)


INTERRUPT_SCRIPT = """
import sys, threading, torch
from trickbag.images import list_image_folder
from trickbag.streaming import StreamingLoader
paths, labels, _ = list_image_folder(sys.argv[1])
loader = StreamingLoader(paths, torch.tensor(labels), image_size=8, batch_size=2, shuffle=True, mean=[0.5] * 3,
                         std=[0.25] * 3, random_resized_crop=True, num_workers=2, lookahead=2)
try:
    for k, (x, y) in enumerate(loader):
        if k == 2:
            raise KeyboardInterrupt  # Ctrl-C in the trainer's step
except KeyboardInterrupt:
    print("interrupted", [t.name for t in threading.enumerate() if t.name == "trickbag-ahead"])
"""


def test_keyboard_interrupt_mid_epoch_leaves_nothing_running(folder, tmp_path):
    script = tmp_path / "interrupt.py"
    script.write_text(INTERRUPT_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(folder)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert (
        done.stdout.strip() == "interrupted []"
    )  # the thread stopped with the pass; the process then exited


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streamed_batches_on_cuda_equal_the_cpu_ones(folder):
    """The CUDA path (pinned memory, non-blocking copies finished by the lookahead thread): same values as on CPU."""
    paths, labels, _ = list_image_folder(folder)
    on_cpu = batches(StreamingLoader(paths, torch.tensor(labels), num_workers=2, **RRC))
    on_gpu = batches(StreamingLoader(paths, torch.tensor(labels), num_workers=2, device="cuda", **RRC))
    assert all(x.is_cuda and y.is_cuda for x, y in on_gpu)
    assert len(on_cpu) == len(on_gpu)
    for (x_cpu, y_cpu), (x_gpu, y_gpu) in zip(on_cpu, on_gpu, strict=True):
        torch.testing.assert_close(x_gpu.cpu(), x_cpu, rtol=1e-6, atol=1e-6)
        assert torch.equal(y_gpu.cpu(), y_cpu)
