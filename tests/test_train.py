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
from trickbag.ema import ModelEMA
from trickbag.losses import ClassifierLoss
from trickbag.precision import Precision
from trickbag.runlog import RunLogger
from trickbag.schedules import Scheduler
from trickbag.train import (
    EarlyStopping,
    FitOptions,
    Loaders,
    NonFiniteLossError,
    Parts,
    TrainState,
    accumulation_step,
    evaluate,
    fit,
    is_improvement,
    restore_training_state,
    training_loss_sums,
)
from trickbag.tta import tta_logits

WEIGHT = torch.tensor([0.3, 2.0, 1.1])


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


def options(epochs: int = 1, **changes) -> FitOptions:
    return FitOptions(epochs=epochs, **({"log_every": 1, "best_metric": "accuracy"} | changes))


def parts_for(model, steps_per_epoch: int, epochs: int, kind: str = "constant", loss=None, **extra) -> Parts:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = Scheduler(optimizer, kind, steps_per_epoch=steps_per_epoch, epochs=epochs)
    return Parts(loss_fn=loss or ClassifierLoss(num_classes=3), optimizer=optimizer, scheduler=scheduler,
                 precision=Precision("fp32", "cpu"), logger=RunLogger(quiet=True), **extra)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Gradient accumulation: k micro-batches == their union in one batch


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


LOSSES = {
    "ce": dict(kind="ce"),
    "ce_weighted": dict(kind="ce", weight=WEIGHT),
    "ce_smoothing_weighted": dict(kind="ce", label_smoothing=0.1, weight=WEIGHT),
    "off_target_weighted": dict(kind="ce", label_smoothing=0.1, smoothing_style="off_target", weight=WEIGHT),
    "focal": dict(kind="focal", focal_gamma=2.0),
    "focal_weighted": dict(kind="focal", focal_gamma=2.0, weight=WEIGHT),
}


@pytest.mark.parametrize("soft", [False, True], ids=["index", "soft"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_accumulated_micro_batches_equal_their_union(name, soft):
    """Micro-batches of 5, 2 and 4 images (class-sorted, so their weight sums differ) == one batch of 11."""
    x, y = data(11, seed=3)
    order = torch.argsort(y, stable=True)
    x, y = x[order], y[order]
    target = torch.softmax(torch.randn(11, 3, generator=torch.Generator().manual_seed(4)), 1) if soft else y
    micro = [(x[:5], target[:5]), (x[5:7], target[5:7]), (x[7:], target[7:])]
    models = []
    for batches, accumulate in ((micro, 3), ([(x, target)], 1)):
        model = tiny_model()
        parts = parts_for(model, 1, 1, loss=ClassifierLoss(num_classes=3, **LOSSES[name]))
        state = fit(model, Loaders(ListLoader(batches)), parts, options(accumulate=accumulate))
        assert state.updates == 1
        models.append(model)
    for accumulated, union in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(accumulated, union, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(next(models[0].parameters()), next(tiny_model().parameters()))


def test_plain_callable_loss_is_treated_as_an_unweighted_mean():
    x, y = data(9)
    micro = [(x[:6], y[:6]), (x[6:], y[6:])]
    models = []
    for batches, accumulate in ((micro, 2), ([(x, y)], 1)):
        model = tiny_model()
        parts = parts_for(model, 1, 1, loss=lambda logits, target: F.cross_entropy(logits, target))
        fit(model, Loaders(ListLoader(batches)), parts, options(accumulate=accumulate))
        models.append(model)
    for accumulated, union in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(accumulated, union, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Dataset-level losses


def test_evaluation_loss_does_not_depend_on_batch_size_or_order():
    x, y = data(23, seed=1)
    model = tiny_model()
    loss = ClassifierLoss(num_classes=3, label_smoothing=0.1, weight=WEIGHT)
    reference = F.cross_entropy(model(x), y, weight=WEIGHT, label_smoothing=0.1).item()
    order = torch.argsort(y)  # a class-sorted folder: most batches hold one class
    for size in (1, 4, 7, 23):
        for xs, ys in ((x, y), (x[order], y[order])):
            batches = [(xs[i : i + size], ys[i : i + size]) for i in range(0, 23, size)]
            assert evaluate(model, batches, loss)["loss"] == pytest.approx(reference, rel=1e-6)


def test_evaluate_and_flip_tta():
    x = torch.randn(10, 1, 4, 5)
    y = torch.randint(0, 3, (10,))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(20, 3))
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]  # odd batch sizes: the mean is per image, not per batch
    loss = ClassifierLoss(num_classes=3)
    scores = evaluate(model, batches, loss)
    assert scores["loss"] == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-6)
    from sklearn.metrics import accuracy_score, f1_score

    from trickbag.metrics import ClassificationMetrics

    scores = evaluate(model, batches, loss, ClassificationMetrics(3, zero_division=0.0))
    predicted = model(x).argmax(1)
    assert scores["accuracy"] == pytest.approx(accuracy_score(y, predicted))
    assert scores["macro_f1"] == pytest.approx(f1_score(y, predicted, average="macro", zero_division=0))
    tta = tta_logits(model, x, flip=True)
    expected = ((model(x).softmax(1) + model(x.flip(3)).softmax(1)) / 2).log()
    torch.testing.assert_close(tta, expected)
    assert model.training  # mode restored
    assert math.isnan(evaluate(model, [], loss)["loss"])  # an empty set has no loss, and no crash


# ---------------------------------------------------------------------------------------------------------------
# fp16 skipped steps, NaN skipping


class SkippingPrecision(Precision):
    """fp32 precision whose step() reports "skipped by the scaler" on chosen updates (1-based)."""

    def __init__(self, skip_updates):
        super().__init__("fp32", "cpu")
        self.skip_updates, self.calls = set(skip_updates), 0

    def step(self, optimizer, *, clip_grad_norm=None, parameters=None):
        self.calls += 1
        if self.calls in self.skip_updates:
            optimizer.zero_grad()
            return False
        return super().step(optimizer, clip_grad_norm=clip_grad_norm, parameters=parameters)


class CountingEMA(ModelEMA):
    def __init__(self, model, decay):
        super().__init__(model, decay)
        self.calls = 0

    def update(self, model):
        self.calls += 1
        super().update(model)


def test_fp16_skipped_update_still_advances_the_schedule_but_not_the_ema():
    """Decision (README): the schedule counts every update, as torch's and timm's loops do, so cosine reaches 0."""
    x, y = data(24)
    batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 24, 4)]
    model = tiny_model()
    parts = parts_for(model, 6, 2, kind="cosine", ema=CountingEMA(model, 0.9))
    parts.precision = SkippingPrecision({2, 5, 9})
    state = fit(model, Loaders(ListLoader(batches)), parts, options(epochs=2))
    assert state.updates == 12 and parts.scheduler.last_step == 12
    assert parts.scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)  # the decay reached its end
    assert parts.ema.calls == 12 - 3


class ListLoss(nn.Module):
    """CE whose n-th call (1-based) in ``bad`` returns NaN."""

    def __init__(self, bad):
        super().__init__()
        self.inner, self.bad, self.calls = ClassifierLoss(num_classes=3, weight=WEIGHT), set(bad), 0
        self.weight = self.inner.weight

    def sums(self, logits, target):
        self.calls += 1
        total, weight = self.inner.sums(logits, target)
        return (total * math.nan if self.calls in self.bad else total), weight

    def forward(self, logits, target):
        total, weight = self.sums(logits, target)
        return total / weight


def test_nan_skip_averages_the_kept_micro_batches_exactly():
    x, y = data(12, seed=2)
    micro = [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]
    skipping = tiny_model()
    parts = parts_for(skipping, 1, 1, loss=ListLoss({2}))
    fit(skipping, Loaders(ListLoader(micro)), parts, options(accumulate=3, nan_policy="skip"))
    kept = tiny_model()
    union = [(torch.cat([x[:4], x[8:]]), torch.cat([y[:4], y[8:]]))]
    fit(kept, Loaders(ListLoader(union)), parts_for(kept, 1, 1, loss=ClassifierLoss(num_classes=3, weight=WEIGHT)),
        options())  # fmt: skip
    for a, b in zip(skipping.parameters(), kept.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_group_of_only_nan_micro_batches_steps_nothing():
    x, y = data(16)
    micro = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 16, 4)]  # groups {1, 2} and {3, 4}
    model = tiny_model()
    ema = CountingEMA(model, 0.9)
    parts = parts_for(model, 2, 1, kind="linear", loss=ListLoss({3, 4}), ema=ema)
    parts.optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    parts.scheduler = Scheduler(parts.optimizer, "linear", steps_per_epoch=2, epochs=1)
    state = fit(model, Loaders(ListLoader(micro)), parts, options(accumulate=2, nan_policy="skip"))
    assert (state.updates, state.skipped_updates) == (1, 1)
    assert parts.scheduler.last_step == 1 and ema.calls == 1
    assert len(parts.optimizer.state) == 2 * 2 and all(  # momentum buffers from exactly one real step
        torch.isfinite(value).all()
        for param_state in parts.optimizer.state.values()
        for value in param_state.values()
    )
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_loss_stops_with_step_and_epoch_keeping_last_good(tmp_path):
    x, y = data(16)
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    model = tiny_model()
    parts = parts_for(model, 2, 3, loss=ListLoss({4}), checkpointer=Checkpointer(tmp_path, {}))
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at epoch 2, micro-batch 2"):
        fit(model, Loaders(ListLoader(batches)), parts, options(epochs=3, log_every=100))
    assert os.readlink(tmp_path / "last") == "last-epoch001"
    weights = load_checkpoint(tmp_path / "last", default_kind="last").weights
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())


# ---------------------------------------------------------------------------------------------------------------
# Best checkpoints, early stopping, resume of both, the LR each update used


def scripted_evaluate(values):
    """evaluate() stand-in returning (loss, accuracy) from a script, one pair per call."""
    calls = iter(values)

    def fake(model, loader, loss_fn, metrics=None, **kwargs):
        loss, accuracy = next(calls)
        return {"loss": loss, "accuracy": accuracy}

    return fake


SCRIPT = [(0.9, 0.50), (0.5, 0.70), (0.6, 0.80), (0.4, 0.75), (0.45, 0.80)]


def test_best_checkpoints_pick_right_epochs_and_survive_resume(tmp_path, monkeypatch):
    x, y = data(16)
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    monkeypatch.setattr(train_module, "evaluate", scripted_evaluate(SCRIPT))
    model = tiny_model()
    (tmp_path / "a").mkdir()
    parts = parts_for(model, 2, 5, checkpointer=Checkpointer(tmp_path / "a", {}))
    straight = fit(model, Loaders(ListLoader(batches), val=[]), parts, options(epochs=5))
    assert (straight.best_loss_epoch, straight.best_metric_epoch) == (4, 3)  # ties (0.80 at 5) keep the first
    assert os.readlink(tmp_path / "a" / "best_loss") == "best_loss-epoch004-val_loss=0.4000"
    assert os.readlink(tmp_path / "a" / "best_metric") == "best_metric-epoch003-val_accuracy=0.8000"
    assert [row["val_accuracy"] for row in straight.history] == [0.5, 0.7, 0.8, 0.75, 0.8]

    # Same run cut after epoch 2 and resumed from its `last` checkpoint.
    run = tmp_path / "b"
    run.mkdir()
    monkeypatch.setattr(train_module, "evaluate", scripted_evaluate(SCRIPT))
    model = tiny_model()
    parts = parts_for(model, 2, 5, checkpointer=Checkpointer(run, {}))
    fit(model, Loaders(ListLoader(batches), val=[]), parts, options(epochs=2))
    model = tiny_model(seed=99)  # a fresh process: other initial weights, everything restored from disk
    parts = parts_for(model, 2, 5, checkpointer=Checkpointer(run, {}))
    saved = load_checkpoint(run / "last", default_kind="last")
    model.load_state_dict(saved.weights)
    loaders = Loaders(ListLoader(batches), val=[])
    state = restore_training_state(saved.state, loaders, parts)
    assert (state.epoch, state.best_loss_epoch, state.best_metric_epoch) == (2, 2, 2)
    resumed = fit(model, loaders, parts, options(epochs=5), state)
    assert (resumed.best_loss_epoch, resumed.best_metric_epoch) == (4, 3)
    assert os.readlink(run / "best_metric") == os.readlink(tmp_path / "a" / "best_metric")

    def scores(history):
        return [(row["epoch"], row["val_loss"], row["val_accuracy"], row["train_loss"]) for row in history]

    assert scores(resumed.history) == scores(straight.history)
    assert resumed.lr_trace == straight.lr_trace == [0.5] * 10


def test_early_stopping_counts_evaluations_and_a_stopped_run_trains_no_more(monkeypatch):
    x, y = data(8)
    monkeypatch.setattr(
        train_module, "evaluate", scripted_evaluate([(1.0, 0.5), (1.0, 0.6), (1.0, 0.6), (1.0, 0.59)] * 3)
    )
    model = tiny_model()
    stop = EarlyStopping(patience=2)
    state = fit(model, Loaders(ListLoader([(x, y)]), val=[]), parts_for(model, 1, 10),
                options(epochs=10, early_stopping=stop))  # fmt: skip
    assert state.stopped_early and state.epoch == 4
    before = copy.deepcopy(model.state_dict())
    again = fit(model, Loaders(ListLoader([(x, y)]), val=[]), parts_for(model, 1, 10),
                options(epochs=10, early_stopping=stop), state)  # fmt: skip
    assert again.epoch == 4 and again.updates == 4  # resuming a stopped run does not train another epoch
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())

    monkeypatch.setattr(train_module, "evaluate", scripted_evaluate([(1.0, 0.5)] * 10))
    stop = EarlyStopping(patience=3, monitor="loss")
    state = fit(model, Loaders(ListLoader([(x, y)]), val=[]), parts_for(model, 1, 10),
                options(epochs=10, early_stopping=stop))  # fmt: skip
    assert state.epoch == 4  # first evaluation sets the best, three more without improvement


def test_lr_trace_is_the_lr_each_update_used_with_plateau_every_other_epoch(monkeypatch):
    """The report draws what the optimizer really got, not a replay of the schedule."""
    x, y = data(12)
    batches = [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]
    monkeypatch.setattr(train_module, "evaluate", scripted_evaluate([(1.0, 0.5)] * 10))
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    used = []
    original_step = optimizer.step

    def recording_step(*args, **kwargs):
        used.append(optimizer.param_groups[0]["lr"])
        return original_step(*args, **kwargs)

    optimizer.step = recording_step
    scheduler = Scheduler(optimizer, "plateau", steps_per_epoch=3, epochs=6, patience=0, factor=0.5)
    parts = Parts(loss_fn=ClassifierLoss(num_classes=3), optimizer=optimizer, scheduler=scheduler,
                  precision=Precision("fp32", "cpu"), logger=RunLogger(quiet=True))  # fmt: skip
    state = fit(model, Loaders(ListLoader(batches), val=[]), parts, options(epochs=6, eval_every_epochs=2))
    assert state.lr_trace == used
    assert used == [0.5] * 6 + [0.5] * 6 + [0.25] * 6  # evaluations after epochs 2, 4, 6; the 2nd is stale


def test_is_improvement():
    assert is_improvement(0.5, None, "max") and is_improvement(0.5, None, "min")
    assert is_improvement(0.6, 0.5, "max") and not is_improvement(0.5, 0.5, "max")
    assert not is_improvement(0.55, 0.5, "max", min_delta=0.1)
    assert is_improvement(0.4, 0.5, "min") and not is_improvement(math.nan, 0.5, "min")
    with pytest.raises(ValueError, match="mode='up' not in"):
        is_improvement(1.0, 0.0, "up")


# ---------------------------------------------------------------------------------------------------------------
# EMA inside fit, distillation, options, precision


def test_ema_inside_fit_evaluates_and_saves_the_averaged_weights(tmp_path):
    """The EMA after fit equals a hand replay of the per-update weights with the warm-up decay."""
    x, y = data(12)
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]
    plain = tiny_model()
    snapshots = []
    parts = parts_for(plain, 2, 2)
    original_step = parts.optimizer.step

    def snapshot_step(*args, **kwargs):
        result = original_step(*args, **kwargs)
        snapshots.append([p.detach().clone() for p in plain.parameters()])
        return result

    parts.optimizer.step = snapshot_step
    fit(plain, Loaders(ListLoader(batches)), parts, options(epochs=2))
    expected = [p.detach().clone() for p in tiny_model().parameters()]
    for count, weights in enumerate(snapshots):
        decay = min(0.99, (1 + count) / (10 + count))  # warm-up: the averaged weights are not mostly initial
        expected = [decay * e + (1 - decay) * w for e, w in zip(expected, weights)]

    model = tiny_model()
    (tmp_path / "run").mkdir()
    parts = parts_for(model, 2, 2, ema=ModelEMA(model, 0.99), checkpointer=Checkpointer(tmp_path / "run", {}))
    fit(model, Loaders(ListLoader(batches), val=batches), parts, options(epochs=2, best_metric="loss"))
    for averaged, reference in zip(parts.ema.module.parameters(), expected):
        torch.testing.assert_close(averaged, reference, rtol=1e-5, atol=1e-6)
    best = load_checkpoint(tmp_path / "run" / "best_loss", with_state=False).weights
    assert any(not torch.equal(best[key], value) for key, value in model.state_dict().items())


def test_distillation_term_matches_formula():
    from trickbag.losses import distillation_loss

    x, y = data(8)
    student, teacher = tiny_model(0), tiny_model(1).eval()
    parts = parts_for(student, 1, 1, teacher=teacher)
    total, weight = training_loss_sums(
        student, x, y, parts, options(distill_alpha=0.3, distill_temperature=2.0)
    )
    loss = total / weight
    logits, teacher_logits = student(x), teacher(x).detach()
    hard = F.cross_entropy(logits, y)
    soft = distillation_loss(logits, teacher_logits, temperature=2.0, alpha=1.0)
    torch.testing.assert_close(loss, 0.7 * hard + 0.3 * soft)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())  # the teacher is not trained


def test_fit_options_are_checked():
    with pytest.raises(ValueError, match="FitOptions.epochs=0 must be an int >= 1"):
        FitOptions(epochs=0)
    with pytest.raises(ValueError, match="nan_policy='ignore' not in"):
        FitOptions(epochs=1, nan_policy="ignore")
    with pytest.raises(ValueError, match="mode='up' not in"):
        FitOptions(epochs=1, best_mode="up")
    model = tiny_model()
    x, y = data(4)
    with pytest.raises(TypeError, match=r"options must be a trickbag.train.FitOptions.*fit_options\(cfg\)"):
        fit(model, Loaders(ListLoader([(x, y)])), parts_for(model, 1, 1), {"epochs": 1})


def test_empty_loader_is_an_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="yields no batches"):
        fit(model, Loaders(ListLoader([])), parts_for(model, 1, 1), options(), TrainState())


def test_bf16_autocast_trains_on_cpu():
    x, y = data(16)
    model = tiny_model()
    parts = parts_for(model, 2, 2)
    parts.precision = Precision("bf16", "cpu")
    state = fit(model, Loaders(ListLoader([(x[:8], y[:8]), (x[8:], y[8:])])), parts, options(epochs=2))
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
    parts = parts_for(model, 2, 2, loss=ClassifierLoss(num_classes=3, weight=WEIGHT).cuda())
    parts.precision = Precision("bf16", "cuda")
    from trickbag.metrics import ClassificationMetrics

    parts.metrics = ClassificationMetrics(3, zero_division=0.0)
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)]
    state = fit(model, Loaders(ListLoader(batches), val=batches), parts, options(epochs=2, accumulate=3))
    assert state.updates == 4 and math.isfinite(state.history[-1]["val_loss"])
