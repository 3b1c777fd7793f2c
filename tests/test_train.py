from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trickbag.train as train_module
from trickbag.checkpoint import Checkpointer, load_checkpoint
from trickbag.config import load_config
from trickbag.ema import ModelEMA, ema_update
from trickbag.precision import Precision
from trickbag.report import RunLogger
from trickbag.schedules import scheduler_from_config
from trickbag.train import (
    Loaders,
    NonFiniteLossError,
    Parts,
    TrainState,
    accumulation_step,
    evaluate,
    fit,
    flip_tta_logits,
    is_improvement,
    make_loss,
    restore_training_state,
)


class ListLoader:
    """Fixed batches, the same every epoch (the loader interface fit needs)."""

    def __init__(self, batches):
        self.batches = batches
        self.epoch = 0

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def state_dict(self):
        return {"epoch": self.epoch}

    def load_state_dict(self, state):
        self.epoch = state["epoch"]


def data(n: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=generator), torch.randint(0, 3, (n,), generator=generator)


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def config(*overrides: str):
    base = ["optimizer.lr=0.5", "optimizer.scale_lr=false", "optimizer.momentum=0", "optimizer.weight_decay=0",
            "schedule.kind=constant", "train.log_every=1", "eval.best_metric=accuracy"]  # fmt: skip
    return load_config(None, [*base, *overrides])


def parts_for(model, cfg, steps_per_epoch, **extra) -> Parts:
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optimizer.lr)
    scheduler = scheduler_from_config(
        optimizer, cfg.schedule, steps_per_epoch=steps_per_epoch, epochs=cfg.epochs
    )
    return Parts(loss_fn=make_loss(num_classes=3), optimizer=optimizer, scheduler=scheduler,
                 precision=Precision("fp32", "cpu"), logger=RunLogger(quiet=True), **extra)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Gradient accumulation


def test_accumulation_step_groups_and_flushes_leftovers():
    marks = [accumulation_step(i, 7, 3) for i in range(7)]
    assert [first for first, _, _ in marks] == [True, False, False, True, False, False, True]
    assert [last for _, last, _ in marks] == [False, False, True, False, False, True, True]
    assert [size for _, _, size in marks] == [3, 3, 3, 3, 3, 3, 1]
    assert all(accumulation_step(i, 5, 1) == (True, True, 1) for i in range(5))
    assert accumulation_step(0, 2, 4) == (True, False, 2) and accumulation_step(1, 2, 4) == (False, True, 2)
    with pytest.raises(ValueError, match=r"index=7 must be in \[0, 7\)"):
        accumulation_step(7, 7, 3)
    with pytest.raises(ValueError, match="accumulate=0 must be >= 1"):
        accumulation_step(0, 7, 0)


def test_accumulation_equals_big_batches_including_partial_group():
    """7 micro-batches of 4, accumulate=3 == big batches of 12, 12 and 4 (the flushed leftover)."""
    x, y = data(28)
    micro = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 28, 4)]
    big = [(x[0:12], y[0:12]), (x[12:24], y[12:24]), (x[24:28], y[24:28])]
    results = []
    for batches, accumulate in ((micro, 3), (big, 1)):
        model = tiny_model()
        cfg = config("epochs=1", f"accumulate={accumulate}")
        parts = parts_for(model, cfg, steps_per_epoch=3)
        state = fit(model, Loaders(ListLoader(batches)), parts, cfg)
        assert state.updates == 3
        results.append(model)
    for accumulated, reference in zip(results[0].parameters(), results[1].parameters()):
        torch.testing.assert_close(accumulated, reference, rtol=1e-5, atol=1e-6)
    # ... and not equal to the seed's `i % N == 0` rule, which steps after the first micro-batch
    untouched = tiny_model()
    assert not torch.allclose(next(results[0].parameters()), next(untouched.parameters()))


# ---------------------------------------------------------------------------------------------------------------
# Scheduler and skipped steps


class SkippingPrecision(Precision):
    """fp32 precision whose step() reports "skipped by the scaler" on chosen updates."""

    def __init__(self, skip_updates):
        super().__init__("fp32", "cpu")
        self.skip_updates, self.calls = set(skip_updates), 0

    def step(self, optimizer, *, clip_grad_norm=None, parameters=None):
        self.calls += 1
        if self.calls in self.skip_updates:
            optimizer.zero_grad()
            return False
        return super().step(optimizer, clip_grad_norm=clip_grad_norm, parameters=parameters)


def test_scheduler_not_stepped_when_scaler_skips():
    x, y = data(24)
    batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 24, 4)]
    model = tiny_model()
    cfg = config("epochs=2")
    parts = parts_for(model, cfg, steps_per_epoch=6)
    parts.precision = SkippingPrecision({2, 5, 9})
    state = fit(model, Loaders(ListLoader(batches)), parts, cfg)
    assert state.updates == 12
    assert parts.scheduler.last_step == 12 - 3


def test_real_fp16_scaler_skip_does_not_step_scheduler():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = scheduler_from_config(optimizer, config().schedule, steps_per_epoch=1, epochs=1)
    try:
        precision = Precision("fp16", "cpu")
    except ValueError:
        pytest.skip("fp16 is not supported on this CPU build")
    x, y = data(4)
    precision.backward(F.cross_entropy(model(x), y))
    next(model.parameters()).grad[0, 0] = math.inf
    if precision.step(optimizer):
        scheduler.step()
    assert scheduler.last_step == 0


# ---------------------------------------------------------------------------------------------------------------
# Best checkpoints, early stopping, resume of both


def scripted_evaluate(values):
    """evaluate() stand-in returning (val_loss, accuracy) from a script, one pair per call."""
    calls = iter(values)

    def fake(model, loader, loss_fn, metrics=None, **kwargs):
        val_loss, accuracy = next(calls)
        return {"val_loss": val_loss, "accuracy": accuracy}

    return fake


SCRIPT = [(0.9, 0.50), (0.5, 0.70), (0.6, 0.80), (0.4, 0.75), (0.45, 0.80)]


def test_best_checkpoints_pick_right_epochs_and_survive_resume(tmp_path, monkeypatch):
    x, y = data(16)
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    monkeypatch.setattr(train_module, "evaluate", scripted_evaluate(SCRIPT))
    model = tiny_model()
    cfg = config("epochs=5")
    parts = parts_for(model, cfg, 2, checkpointer=Checkpointer(tmp_path / "a", {}))
    (tmp_path / "a").mkdir()
    straight = fit(model, Loaders(ListLoader(batches), val=[]), parts, cfg)
    assert (straight.best_loss_epoch, straight.best_metric_epoch) == (4, 3)  # ties (0.80 at 5) keep the first
    assert os.readlink(tmp_path / "a" / "best_loss") == "best_loss-epoch004-val_loss=0.4000"
    assert os.readlink(tmp_path / "a" / "best_metric") == "best_metric-epoch003-accuracy=0.8000"

    # Same run cut after epoch 2 and resumed from its `last` checkpoint.
    run = tmp_path / "b"
    run.mkdir()
    monkeypatch.setattr(train_module, "evaluate", scripted_evaluate(SCRIPT))
    model = tiny_model()
    short = config("epochs=5")
    parts = parts_for(model, short, 2, checkpointer=Checkpointer(run, {}))
    short_first = short.model_copy(update={"epochs": 2})
    fit(model, Loaders(ListLoader(batches), val=[]), parts, short_first)
    model = tiny_model(seed=99)  # a fresh process: other initial weights, everything restored from disk
    parts = parts_for(model, short, 2, checkpointer=Checkpointer(run, {}))
    saved = load_checkpoint(run / "last", default_kind="last")
    model.load_state_dict(saved.weights)
    loaders = Loaders(ListLoader(batches), val=[])
    state = restore_training_state(saved.state, loaders, parts)
    assert (state.epoch, state.best_loss_epoch, state.best_metric_epoch) == (2, 2, 2)
    resumed = fit(model, loaders, parts, short, state)
    assert (resumed.best_loss_epoch, resumed.best_metric_epoch) == (4, 3)
    assert os.readlink(run / "best_metric") == os.readlink(tmp_path / "a" / "best_metric")

    def scores(history):
        return [(row["epoch"], row["val_loss"], row["accuracy"], row["train_loss"]) for row in history]

    assert scores(resumed.history) == scores(straight.history)


def test_early_stopping_counts_evaluations(monkeypatch):
    x, y = data(8)
    monkeypatch.setattr(
        train_module, "evaluate", scripted_evaluate([(1.0, 0.5), (1.0, 0.6), (1.0, 0.6), (1.0, 0.59)] * 3)
    )
    model = tiny_model()
    cfg = config("epochs=10", "early_stopping.enabled=true", "early_stopping.patience=2")
    state = fit(model, Loaders(ListLoader([(x, y)]), val=[]), parts_for(model, cfg, 1), cfg)
    assert state.stopped_early and state.epoch == 4
    cfg = config("epochs=10", "early_stopping.enabled=true", "early_stopping.monitor=val_loss",
                 "early_stopping.patience=3")  # fmt: skip
    monkeypatch.setattr(train_module, "evaluate", scripted_evaluate([(1.0, 0.5)] * 10))
    state = fit(model, Loaders(ListLoader([(x, y)]), val=[]), parts_for(model, cfg, 1), cfg)
    assert state.epoch == 4  # first evaluation sets the best, three more without improvement


def test_is_improvement():
    assert is_improvement(0.5, None, "max") and is_improvement(0.5, None, "min")
    assert is_improvement(0.6, 0.5, "max") and not is_improvement(0.5, 0.5, "max")
    assert not is_improvement(0.55, 0.5, "max", min_delta=0.1)
    assert is_improvement(0.4, 0.5, "min") and not is_improvement(math.nan, 0.5, "min")
    with pytest.raises(ValueError, match="mode='up' not in"):
        is_improvement(1.0, 0.0, "up")


# ---------------------------------------------------------------------------------------------------------------
# NaN / inf


def nan_after(calls: int):
    count = {"n": 0}
    base = make_loss(num_classes=3)

    def loss_fn(logits, target):
        count["n"] += 1
        loss = base(logits, target)
        return loss * math.nan if count["n"] > calls else loss

    return loss_fn


def test_nan_loss_stops_with_step_and_epoch_keeping_last_good(tmp_path):
    x, y = data(16)
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    model = tiny_model()
    cfg = config("epochs=3", "train.log_every=100")
    parts = parts_for(model, cfg, 2, checkpointer=Checkpointer(tmp_path, {}))
    parts.loss_fn = nan_after(3)  # epoch 1: 2 train losses; epoch 2: the second one is nan
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at epoch 2, micro-batch 2"):
        fit(model, Loaders(ListLoader(batches)), parts, cfg)
    assert os.readlink(tmp_path / "last") == "last-epoch001"
    weights = load_checkpoint(tmp_path / "last", default_kind="last").weights
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())


def test_nan_policy_skip_skips_the_step():
    x, y = data(16)
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    model = tiny_model()
    cfg = config("epochs=2", "train.nan_policy=skip")
    parts = parts_for(model, cfg, 2)
    parts.loss_fn = nan_after(1)
    fit(model, Loaders(ListLoader(batches)), parts, cfg)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------
# Losses, evaluation, EMA


def test_make_loss_matches_references():
    generator = torch.Generator().manual_seed(0)
    logits, target = torch.randn(9, 4, generator=generator), torch.randint(0, 4, (9,), generator=generator)
    weight = torch.tensor([1.0, 2.0, 0.5, 1.5])
    plain = make_loss(num_classes=4, label_smoothing=0.1, weight=weight)
    torch.testing.assert_close(
        plain(logits, target), F.cross_entropy(logits, target, weight=weight, label_smoothing=0.1)
    )
    focal = make_loss("focal", num_classes=4, focal_gamma=0.0, weight=weight)
    torch.testing.assert_close(focal(logits, target), F.cross_entropy(logits, target, weight=weight))
    soft = torch.softmax(torch.randn(9, 4, generator=generator), 1)
    # soft targets (from mixing) with class weights: sum(w_c q_c -log p_c) / sum(w_c q_c)
    weighted = -(weight * soft * logits.log_softmax(1)).sum() / (weight * soft).sum()
    torch.testing.assert_close(plain(logits, soft), weighted)
    unweighted = make_loss(num_classes=4)
    torch.testing.assert_close(unweighted(logits, soft), F.cross_entropy(logits, soft))
    with pytest.raises(ValueError, match="loss kind='hinge' not in"):
        make_loss("hinge", num_classes=4)


def test_evaluate_and_flip_tta():
    x = torch.randn(10, 1, 4, 5)
    y = torch.randint(0, 3, (10,))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(20, 3))
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]  # odd batch sizes: the mean is per image, not per batch
    scores = evaluate(model, batches, make_loss(num_classes=3))
    torch.testing.assert_close(scores["val_loss"], F.cross_entropy(model(x), y).item())
    from sklearn.metrics import accuracy_score, f1_score

    from trickbag.metrics import ClassificationMetrics

    scores = evaluate(model, batches, make_loss(num_classes=3), ClassificationMetrics(3, zero_division=0.0))
    predicted = model(x).argmax(1)
    assert scores["accuracy"] == pytest.approx(accuracy_score(y, predicted))
    assert scores["macro_f1"] == pytest.approx(f1_score(y, predicted, average="macro", zero_division=0))
    tta = flip_tta_logits(model, x)
    expected = ((model(x).softmax(1) + model(x.flip(3)).softmax(1)) / 2).log()
    torch.testing.assert_close(tta, expected)
    assert model.training  # mode restored


def test_ema_update_matches_formula():
    ema, value = [torch.tensor([1.0, 2.0])], [torch.tensor([3.0, 6.0])]
    ema_update(ema, value, 0.9)
    torch.testing.assert_close(ema[0], torch.tensor([1.2, 2.4]))
    model = nn.BatchNorm1d(2)
    averaged = ModelEMA(model, 0.5)
    before = copy.deepcopy(model.weight.detach())
    with torch.no_grad():
        model.weight.add_(2.0)
        model.running_mean.fill_(3.0)
    averaged.update(model)
    torch.testing.assert_close(averaged.module.weight, before + 1.0)
    torch.testing.assert_close(averaged.module.running_mean, torch.full((2,), 3.0))  # buffers copied
    with pytest.raises(ValueError, match="decay=1.0 must be in"):
        ModelEMA(model, 1.0)


def test_empty_loader_is_an_error():
    model = tiny_model()
    cfg = config()
    with pytest.raises(ValueError, match="yields no batches"):
        fit(model, Loaders(ListLoader([])), parts_for(model, cfg, 1), cfg, TrainState())


def test_distillation_term_matches_formula():
    from trickbag.losses import distillation_loss
    from trickbag.train import training_loss

    x, y = data(8)
    student, teacher = tiny_model(0), tiny_model(1).eval()
    cfg = config("distill.alpha=0.3", "distill.temperature=2.0")
    parts = parts_for(student, cfg, 1, teacher=teacher)
    loss = training_loss(student, x, y, parts, cfg)
    logits, teacher_logits = student(x), teacher(x).detach()
    hard = F.cross_entropy(logits, y)
    soft = distillation_loss(logits, teacher_logits, temperature=2.0, alpha=1.0)
    torch.testing.assert_close(loss, 0.7 * hard + 0.3 * soft)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())  # the teacher is not trained


def test_bf16_autocast_trains_on_cpu():
    x, y = data(16)
    model = tiny_model()
    cfg = config("epochs=2", "precision=bf16")
    parts = parts_for(model, cfg, 2)
    parts.precision = Precision("bf16", "cpu")
    state = fit(model, Loaders(ListLoader([(x[:8], y[:8]), (x[8:], y[8:])])), parts, cfg)
    assert math.isfinite(state.history[-1]["train_loss"])
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay fp32 under autocast


def test_tensorboard_missing_is_a_clear_error(tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match=r"pip install 'trickbag\[tensorboard\]'"):
            RunLogger(tmp_path, tensorboard=True)
    else:
        RunLogger(tmp_path, tensorboard=True).close()
        assert (tmp_path / "tensorboard").is_dir()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fit_on_cuda_with_bf16_and_accumulation():
    x, y = data(32)
    x, y = x.cuda(), y.cuda()
    model = tiny_model().cuda()
    cfg = config("epochs=2", "accumulate=3", "precision=bf16")
    parts = parts_for(model, cfg, 2)
    parts.precision = Precision("bf16", "cuda")
    parts.loss_fn = make_loss(num_classes=3, weight=torch.ones(3))
    from trickbag.metrics import ClassificationMetrics

    parts.metrics = ClassificationMetrics(3, zero_division=0.0)
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)]
    state = fit(model, Loaders(ListLoader(batches), val=batches), parts, cfg)
    assert state.updates == 4 and math.isfinite(state.history[-1]["val_loss"])
