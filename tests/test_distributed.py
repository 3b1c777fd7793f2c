"""Several processes (gloo, 2 CPU processes on 127.0.0.1): the same numbers as one process, and no hangs.

Each multi-process check runs its ranks with ``torch.multiprocessing.spawn`` (or torchrun for the launcher and
the two-"node" rendezvous) and compares with one process computing the same thing in this test process.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from trickbag import distributed
from trickbag.checkpoint import Checkpointer, load_checkpoint
from trickbag.data import BatchLoader, shard_positions
from trickbag.losses import ClassifierLoss
from trickbag.metrics import ClassificationMetrics
from trickbag.muon import Muon, muon_param_groups
from trickbag.precision import Precision
from trickbag.schedules import Scheduler
from trickbag.train import FitOptions, Loaders, Parts, evaluate, fit, restore_training_state

WORLD = 2
BATCH = 8  # one process; each of the two processes takes BATCH // 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, scenario: str, args: tuple, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        result = globals()[scenario](rank, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(scenario: str, tmp_path: Path, *args) -> list:
    """Run ``scenario(rank, *args)`` in WORLD spawned processes; their results, rank order."""
    out = Path(tempfile.mkdtemp(prefix=f"out-{scenario}-", dir=tmp_path))
    mp.spawn(_worker, args=(free_port(), scenario, args, str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# ---------------------------------------------------------------------------------------------------------------
# Data, model and parts shared by one process and by each rank


def dataset(n: int = 40, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 3, (n,), generator=generator)
    return images, labels


def make_model(batchnorm: bool, hidden_conv: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 6, 3, padding=1)]
    layers += [nn.BatchNorm2d(6)] if batchnorm else []
    layers += (
        [nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)] if hidden_conv else []
    )  # for Muon
    layers += [nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)]
    return nn.Sequential(*layers)


def train_loader(batch: int, rank: int = 0, world: int = 1) -> BatchLoader:
    images, labels = dataset()
    return BatchLoader(images, labels, batch_size=batch, shuffle=True, drop_last=True, seed=3, crop_padding=1,
                       flip=True, mean=[0.5] * 3, std=[0.25] * 3, rank=rank, world_size=world)  # fmt: skip


def make_parts(model: nn.Module, loader, epochs: int, checkpointer=None, weighted: bool = False,
               muon: bool = False) -> Parts:  # fmt: skip
    if muon:
        optimizer = Muon(muon_param_groups(model, lr=0.2, weight_decay=0.0), lr=0.2, muon_lr=0.05)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    steps = math.ceil(len(loader) / 2)
    weight = torch.tensor([1.0, 2.0, 0.5]) if weighted else None
    return Parts(loss_fn=ClassifierLoss(num_classes=3, weight=weight), optimizer=optimizer,
                 scheduler=Scheduler(optimizer, "cosine", steps_per_epoch=steps, epochs=epochs),
                 precision=Precision("fp32", "cpu"), checkpointer=checkpointer)  # fmt: skip


OPTIONS = {"accumulate": 2, "best_metric": "loss", "log_every": 1}


def train(batchnorm: bool, sync_bn: bool, epochs: int, rank: int = 0, world: int = 1, weighted: bool = False,
          muon: bool = False):  # fmt: skip
    model = make_model(batchnorm, hidden_conv=muon)
    if sync_bn:
        model = distributed.convert_sync_batchnorm(model)
    loader = train_loader(BATCH // world, rank, world)
    parts = make_parts(model, loader, epochs, weighted=weighted, muon=muon)
    fit(model, Loaders(loader), parts, FitOptions(epochs=epochs, **OPTIONS))
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def scenario_equal_updates(rank: int) -> dict:
    return {
        "plain": train(False, False, 2, rank, WORLD, weighted=True),
        "sync_bn": train(True, True, 2, rank, WORLD),
        "muon": train(True, True, 2, rank, WORLD, muon=True),  # the optimizer steps on all-reduced gradients
    }


# ---------------------------------------------------------------------------------------------------------------
# Sharding (no processes needed)


@pytest.mark.parametrize("n, batch, drop_last", [(37, 4, False), (37, 4, True), (5, 2, False), (40, 4, True)])
def test_shards_use_every_item_once_and_form_the_global_batches(n, batch, drop_last):
    shards = [shard_positions(n, r, WORLD, batch, drop_last) for r in range(WORLD)]
    union = torch.cat(shards).sort().values
    expected = n if not drop_last else (n // (batch * WORLD)) * batch * WORLD
    assert torch.equal(union, torch.arange(expected))  # each position once, nothing padded
    if drop_last:  # k-th batch of every rank together == k-th global batch of one process
        assert len(shards[0]) == len(shards[1])
        for k in range(len(shards[0]) // batch):
            together = torch.cat([s[k * batch : (k + 1) * batch] for s in shards]).sort().values
            assert torch.equal(together, torch.arange(k * batch * WORLD, (k + 1) * batch * WORLD))
    for r in range(WORLD):  # len() of a sharded loader agrees with its batches
        images, labels = dataset(n)
        loader = BatchLoader(images, labels, batch_size=batch, shuffle=True, drop_last=drop_last, rank=r,
                             world_size=WORLD)  # fmt: skip
        assert len(loader) == len(list(loader))


def test_sharded_loader_batches_are_the_global_batches_augmented_identically():
    one = list(train_loader(BATCH))
    ranks = [list(train_loader(BATCH // WORLD, r, WORLD)) for r in range(WORLD)]
    for k, (x, y) in enumerate(one):
        # rank r holds positions r, r+2, ... of the global batch: interleave them back
        x_ranks = torch.stack([ranks[r][k][0] for r in range(WORLD)], 1).flatten(0, 1)
        y_ranks = torch.stack([ranks[r][k][1] for r in range(WORLD)], 1).flatten(0, 1)
        assert torch.equal(x_ranks, x) and torch.equal(y_ranks, y)


def test_shard_arguments_are_checked():
    images, labels = dataset()
    with pytest.raises(ValueError, match="rank"):
        BatchLoader(images, labels, batch_size=4, shuffle=False, rank=2, world_size=2)
    with pytest.raises(ValueError, match="world_size"):
        BatchLoader(images, labels, batch_size=4, shuffle=False, world_size=0)


def test_single_process_helpers_are_the_identity():
    assert not distributed.is_distributed() and distributed.world_size() == 1 and distributed.is_main()
    t = torch.arange(3.0)
    assert torch.equal(distributed.all_reduce_sum(t), t) and distributed.broadcast_object("x") == "x"
    assert distributed.rank_seed(0, 0, 1) != distributed.rank_seed(0, 1, 0)
    model = make_model(True)
    assert distributed.wrap_ddp(model) is model


# ---------------------------------------------------------------------------------------------------------------
# Two processes


def test_two_processes_with_half_batches_give_the_weights_of_one_process(tmp_path):
    torch.set_num_threads(1)
    reference = {"plain": train(False, False, 2, weighted=True), "sync_bn": train(True, False, 2),
                 "muon": train(True, False, 2, muon=True)}  # fmt: skip
    results = run_ranks("scenario_equal_updates", tmp_path)
    for kind in ("plain", "sync_bn", "muon"):
        for key, value in reference[kind].items():
            for rank in range(WORLD):
                got = results[rank][kind][key]
                assert torch.allclose(got.double(), value.double(), rtol=1e-4, atol=1e-5), (kind, key, rank)
    # the updates really moved the weights (a broken step would also give equal weights)
    assert not torch.allclose(reference["plain"]["4.weight"], make_model(False).state_dict()["4.weight"])
    untrained = make_model(True, hidden_conv=True).state_dict()
    assert not torch.allclose(reference["muon"]["2.weight"], untrained["2.weight"])  # the conv Muon trains


def eval_set():
    images, labels = dataset(37, seed=5)  # 37: not divisible by 2
    return images, labels


def evaluate_on(rank: int = 0, world: int = 1) -> dict:
    model = make_model(True)
    with torch.no_grad():  # non-trivial running statistics
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    images, labels = eval_set()
    loader = BatchLoader.for_eval(images, labels, batch_size=5, mean=[0.5] * 3, std=[0.25] * 3, rank=rank,
                                  world_size=world)  # fmt: skip
    loss = ClassifierLoss(num_classes=3, weight=torch.tensor([1.0, 3.0, 0.5]))
    return evaluate(model, loader, loss, ClassificationMetrics(3, zero_division=0.0))


def scenario_evaluate(rank: int) -> dict:
    return evaluate_on(rank, WORLD)


def test_distributed_evaluation_equals_one_process_metric_by_metric(tmp_path):
    reference = evaluate_on()
    results = run_ranks("scenario_evaluate", tmp_path)
    assert {"loss", "accuracy", "macro_f1", "auroc"} <= set(reference)
    for rank in range(WORLD):
        assert set(results[rank]) == set(reference)
        for key, value in reference.items():
            assert results[rank][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (key, rank)


def fit_epochs(model, loader, run_dir, epochs, resume_from=None):
    Path(run_dir).mkdir(exist_ok=True)
    checkpointer = Checkpointer(run_dir, {"test": True})
    parts = make_parts(model, loader, 3, checkpointer)
    loaders = Loaders(loader)
    state = None
    if resume_from is not None:
        checkpoint = load_checkpoint(resume_from, default_kind="last")
        model.load_state_dict(checkpoint.weights)
        state = restore_training_state(checkpoint.state, loaders, parts)
    fit(model, loaders, parts, FitOptions(epochs=epochs, **OPTIONS), state)
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def scenario_resume(rank: int, first_dirs: list[str], resume_from: str | None, epochs: int) -> dict:
    """Two processes: train to ``epochs`` (from ``resume_from`` if given), each rank in its own folder."""
    run_dir = Path(first_dirs[rank])
    weights = fit_epochs(make_model(False), train_loader(BATCH // WORLD, rank, WORLD), run_dir, epochs,
                            resume_from)  # fmt: skip
    return {"weights": weights, "files": sorted(p.name for p in run_dir.iterdir())}


def test_checkpoints_move_between_two_processes_and_one(tmp_path):
    torch.set_num_threads(1)
    straight = fit_epochs(make_model(False), train_loader(BATCH), tmp_path / "straight", 3)
    # 2 processes for 2 epochs, then 1 process for the third
    dirs = [tmp_path / "two-rank0", tmp_path / "two-rank1"]
    for d in dirs:
        d.mkdir()
    two = run_ranks("scenario_resume", tmp_path, [str(d) for d in dirs], None, 2)
    assert two[1]["files"] == []  # rank 1 wrote nothing
    assert "last" in two[0]["files"]
    resumed_on_one = fit_epochs(make_model(False), train_loader(BATCH), tmp_path / "one-after", 3,
                                   dirs[0] / "last")  # fmt: skip
    # 1 process for 2 epochs, then 2 processes for the third
    single = fit_epochs(make_model(False), train_loader(BATCH), tmp_path / "one", 2)
    dirs2 = [tmp_path / "after-rank0", tmp_path / "after-rank1"]
    for d in dirs2:
        d.mkdir()
    resumed_on_two = run_ranks(
        "scenario_resume", tmp_path, [str(d) for d in dirs2], str(tmp_path / "one" / "last"), 3
    )
    assert resumed_on_two[1]["files"] == []
    for key, value in straight.items():
        assert torch.allclose(resumed_on_one[key], value, rtol=1e-4, atol=1e-5), key
        for rank in range(WORLD):
            assert torch.allclose(resumed_on_two[rank]["weights"][key], value, rtol=1e-4, atol=1e-5), key
    assert not torch.allclose(single["4.weight"], straight["4.weight"])  # epoch 3 did change the weights


# ---------------------------------------------------------------------------------------------------------------
# The launcher: a failing rank stops the job; two "nodes" over the loopback address


FAILING = """
import os, torch, torch.distributed as dist
from trickbag import distributed
context = distributed.init_from_env("cpu", timeout_s=60)
if context.rank == 1:
    raise ValueError("rank 1 exploded on purpose")
dist.barrier()  # rank 0 would wait here forever without the launcher stopping it
"""

REDUCE = """
import torch
from trickbag import distributed
context = distributed.init_from_env("cpu", timeout_s=60)
total = distributed.all_reduce_sum(torch.tensor([float(context.rank + 1)]))
print(f"rank {context.rank} of {context.world_size}: sum {float(total[0]):g}", flush=True)
distributed.close()
"""


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def test_a_failing_rank_stops_the_job_with_its_message(tmp_path):
    script = tmp_path / "failing.py"
    script.write_text(textwrap.dedent(FAILING))
    started = time.perf_counter()
    done = subprocess.run(torchrun("--standalone", "--nproc-per-node=2", str(script)), capture_output=True,
                          text=True, timeout=90, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode != 0
    assert "rank 1 exploded on purpose" in done.stdout + done.stderr
    assert time.perf_counter() - started < 60  # stopped by the launcher, not by the collective timeout


def test_two_nodes_rendezvous_over_loopback(tmp_path):
    script = tmp_path / "reduce.py"
    script.write_text(textwrap.dedent(REDUCE))
    port = str(free_port())
    common = ["--nnodes=2", "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(torchrun(*common, f"--node-rank={rank}", str(script)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env) for rank in range(2)]  # fmt: skip
    outputs = [node.communicate(timeout=90)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert "rank 0 of 2: sum 3" in outputs[0] and "rank 1 of 2: sum 3" in outputs[1]


def whitening_batch(rank: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 + rank)  # every rank sees different images
    x = torch.randn(4, 3, 8, 8, generator=generator)
    return x + 0.7 * x.roll(1, dims=3)


def scenario_whitening(rank: int) -> torch.Tensor:
    from trickbag.models import PatchWhitening

    torch.manual_seed(rank)
    layer = PatchWhitening(3, 4, stride=2, padding=1, out_channels=8, trainable=True, bias=False).train()
    layer(whitening_batch(rank))
    return layer.conv.weight.detach()


def test_patch_whitening_takes_rank_zeros_filters(tmp_path):
    """Fitted on each rank's own first batch, the filters must still be one init for all (DDP assumes it)."""
    from trickbag.models import PatchWhitening

    reference = PatchWhitening(3, 4, stride=2, padding=1, out_channels=8, trainable=True, bias=False).train()
    reference(whitening_batch(0))
    alone_on_rank1 = PatchWhitening(
        3, 4, stride=2, padding=1, out_channels=8, trainable=True, bias=False
    ).train()
    alone_on_rank1(whitening_batch(1))
    assert not torch.allclose(alone_on_rank1.conv.weight, reference.conv.weight)  # the data differ
    for weights in run_ranks("scenario_whitening", tmp_path):
        torch.testing.assert_close(weights, reference.conv.weight.detach())
