"""The training loop: ``fit(model, loaders, parts, cfg)``.

One readable loop, no base class and no hooks. ``parts`` is a plain dataclass holding the pieces the loop
composes (loss, optimizer, scheduler, precision, mixer, EMA, teacher, metrics, checkpointer, logger); build them
yourself or with ``trickbag.run.build_run`` from a config. The step is the seed's
zero_grad -> forward -> loss -> backward -> step, plus gradient accumulation, autocast, clipping and EMA.

Calling contract of the parts: ``scheduler.step()`` once per *real* optimizer update (not when the fp16 scaler
skipped it), ``scheduler.observe(value)`` after each evaluation; ``precision.step(...)`` returns False on a
skipped step.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trickbag.checkpoint import capture_rng_state, restore_rng_state
from trickbag.report import Progress, RunLogger

LOSS_MONITOR = "val_loss"


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf with ``nan_policy: stop``."""


@dataclass
class Loaders:
    train: Any  # iterable of (x, y) with len(), set_epoch(), state_dict() (trickbag.data.BatchLoader)
    val: Any | None = None  # evaluation batches (x, y); None: no evaluation, only `last` checkpoints


@dataclass
class Parts:
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, int or soft target) -> scalar
    optimizer: torch.optim.Optimizer
    scheduler: Any  # trickbag.schedules: step() per update, observe(metric), get_last_lr()
    precision: Any  # trickbag.precision.Precision
    metrics: Any | None = None  # trickbag.metrics.ClassificationMetrics
    mixer: Any | None = None  # trickbag.mixing.BatchMixer
    ema: Any | None = None  # trickbag.ema.ModelEMA
    teacher: nn.Module | None = None
    checkpointer: Any | None = None  # trickbag.checkpoint.Checkpointer
    logger: RunLogger = field(default_factory=RunLogger)


@dataclass
class TrainState:
    """Progress that a resumed run must continue from (saved in every `last` checkpoint)."""

    epoch: int = 0  # epochs completed
    updates: int = 0  # optimizer updates done (including fp16-skipped ones)
    best_loss: float = math.inf
    best_loss_epoch: int = 0
    best_metric: float | None = None
    best_metric_epoch: int = 0
    stale_evaluations: int = 0  # early stopping: evaluations without improvement
    early_stop_best: float | None = None
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# Small tested helpers


def accumulation_step(index: int, num_batches: int, accumulate: int) -> tuple[bool, bool, int]:
    """Where micro-batch ``index`` (0-based) of an epoch of ``num_batches`` sits in its accumulation group.

    Groups are consecutive runs of ``accumulate`` micro-batches; the last group of an epoch may be smaller and
    is still flushed (an update happens at the end of every epoch).

    Returns:
        (first, last, size): zero the gradients before it, step the optimizer after it, and the number of
        micro-batches in its group (divide the loss by this).
    """
    if not 0 <= index < num_batches:
        raise ValueError(f"index={index} must be in [0, {num_batches})")
    if accumulate < 1:
        raise ValueError(f"accumulate={accumulate} must be >= 1")
    start = index - index % accumulate
    size = min(accumulate, num_batches - start)
    return index == start, index == start + size - 1, size


def is_improvement(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """``value`` beats ``best`` by more than ``min_delta`` in direction ``mode`` ("max"/"min"); None is beaten."""
    if mode not in ("max", "min"):
        raise ValueError(f"mode={mode!r} not in ('max', 'min')")
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best + min_delta if mode == "max" else value < best - min_delta


def resolve_mode(mode: str, monitor: str) -> str:
    """ "auto" -> "min" for losses, "max" for metrics."""
    if mode != "auto":
        return mode
    return "min" if "loss" in monitor else "max"


def flip_tta_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Log of the mean softmax over the image and its mirror: usable as logits, (N, C) float32."""
    probs = model(x).float().softmax(1) + model(x.flip(3)).float().softmax(1)
    return (probs / 2).log()


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


@torch.inference_mode()
def evaluate(
    model, loader, loss_fn, metrics=None, *, precision=None, flip_tta: bool = False
) -> dict[str, float]:
    """Mean loss and metrics of ``model`` on ``loader`` (eval mode, no gradients, optional flip TTA).

    Returns:
        {"val_loss": float, **metrics.compute()} (numeric metrics only).
    """
    was_training = model.training
    model.eval()
    if metrics is not None:
        metrics.reset()
    total, count = None, 0
    for x, y in loader:
        with precision.autocast() if precision is not None else contextlib.nullcontext():
            logits = flip_tta_logits(model, x) if flip_tta else model(x).float()
        batch_loss = loss_fn(logits, y).detach() * len(y)
        total = batch_loss if total is None else total + batch_loss
        count += len(y)
        if metrics is not None:
            metrics.update(logits.softmax(1), y)  # probabilities: AUROC ranks them, not raw logits
    model.train(was_training)
    result = {LOSS_MONITOR: float(total.item() / max(count, 1)) if total is not None else math.nan}
    if metrics is not None:
        for key, value in metrics.compute().items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                result[key] = float(value)
    return result


@torch.inference_mode()
def predict_probabilities(model, loader, *, precision=None, flip_tta: bool = False) -> torch.Tensor:
    """Class probabilities (N, C) float32 on the CPU for every batch ``(x, _)`` of ``loader``, in order."""
    was_training = model.training
    model.eval()
    probabilities = []
    for x, _ in loader:
        with precision.autocast() if precision is not None else contextlib.nullcontext():
            logits = flip_tta_logits(model, x) if flip_tta else model(x).float()
        probabilities.append(logits.float().softmax(1).cpu())
    model.train(was_training)
    return torch.cat(probabilities)


# ---------------------------------------------------------------------------------------------------------------
# The loop


def training_loss(model, x, y, parts: Parts, cfg) -> torch.Tensor:
    """Forward + loss of one micro-batch (mixing, autocast and distillation included)."""
    if parts.mixer is not None:
        x, y = parts.mixer(x, y)
    with parts.precision.autocast():
        logits = model(x)
        loss = parts.loss_fn(logits, y)
        if parts.teacher is not None:
            with torch.no_grad():
                teacher_logits = parts.teacher(x)
            from trickbag.losses import distillation_loss

            alpha = cfg.distill.alpha
            kd = distillation_loss(logits, teacher_logits, temperature=cfg.distill.temperature, alpha=1.0)
            loss = (1.0 - alpha) * loss + alpha * kd
    return loss


def fit(model: nn.Module, loaders: Loaders, parts: Parts, cfg, state: TrainState | None = None) -> TrainState:
    """Train ``model`` for ``cfg.epochs`` epochs (continuing from ``state`` when resuming); returns the state.

    ``cfg`` is a ``trickbag.config.Config`` whose ``eval.best_metric`` is already resolved (not "auto").
    """
    state = state or TrainState()
    log = parts.logger
    num_batches = len(loaders.train)
    if num_batches == 0:
        raise ValueError("the training loader yields no batches; lower batch_size or add data")
    params = [p for p in model.parameters() if p.requires_grad]
    progress = Progress(log, total=num_batches * (cfg.epochs - state.epoch))
    for epoch in range(state.epoch, cfg.epochs):
        started = time.perf_counter()
        model.train()
        loaders.train.set_epoch(epoch)
        if parts.mixer is not None:
            parts.mixer.set_epoch(epoch)
        window, losses, images, skipped = [], [], 0, 0
        for index, (x, y) in enumerate(loaders.train):
            first, last, group_size = accumulation_step(index, num_batches, cfg.accumulate)
            if first:
                parts.optimizer.zero_grad(set_to_none=True)
            loss = training_loss(model, x, y, parts, cfg)
            # nan_policy=skip must look at every loss (one host sync per step); "stop" checks once per log window.
            if cfg.train.nan_policy == "skip" and not torch.isfinite(loss):
                skipped += 1
            else:
                parts.precision.backward(loss / group_size if group_size > 1 else loss)
                window.append(loss.detach())
            images += len(x)
            if last:
                clip = cfg.train.clip_grad_norm
                if parts.precision.step(parts.optimizer, clip_grad_norm=clip, parameters=params):
                    parts.scheduler.step()  # only real updates advance the schedule (fp16 may skip one)
                    if parts.ema is not None:
                        parts.ema.update(model)
                state.updates += 1
                if state.updates % cfg.train.log_every == 0 or index == num_batches - 1:
                    running = _check_window(window, epoch, state.updates, parts, progress)
                    losses += [running] * len(window)
                    if state.updates % cfg.train.log_every == 0:
                        log.info(
                            f"epoch {epoch + 1} update {state.updates}: loss {running:.4f} lr {progress.lr}"
                        )
                    window = []
            progress.advance(images, started)
        if skipped:
            log.info(
                f"epoch {epoch + 1}: skipped {skipped} micro-batches with a non-finite loss (nan_policy=skip)"
            )
        row = {"epoch": epoch + 1, "train_loss": sum(losses) / len(losses) if losses else math.nan}
        if loaders.val is not None and (
            (epoch + 1) % cfg.train.eval_every_epochs == 0 or epoch + 1 == cfg.epochs
        ):
            row.update(_evaluate_epoch(model, loaders, parts, cfg, state, epoch + 1, progress))
        row.update(lr=parts.scheduler.get_last_lr()[0], time_s=round(time.perf_counter() - started, 3))
        row["images_per_s"] = round(images / max(row["time_s"], 1e-9), 1)
        state.history.append(row)
        state.epoch = epoch + 1
        log.epoch(row, state.history)
        if parts.checkpointer is not None:
            parts.checkpointer.save(
                "last", model, state=training_state(model, loaders, parts, state), epoch=epoch + 1
            )
        if state.stopped_early:
            log.info(
                f"early stopping after epoch {epoch + 1}: {cfg.early_stopping.patience} evaluations without improvement"
            )
            break
    progress.close()
    return state


def _evaluate_epoch(model, loaders: Loaders, parts: Parts, cfg, state: TrainState, epoch: int, progress):
    """Evaluate (EMA weights if any), feed the plateau schedule, save best checkpoints, track early stopping."""
    eval_model = parts.ema.module if parts.ema is not None else model
    scores = evaluate(eval_model, loaders.val, parts.loss_fn, parts.metrics, precision=parts.precision,
                      flip_tta=cfg.eval.flip_tta)  # fmt: skip
    if not math.isfinite(scores[LOSS_MONITOR]):
        progress.close()
        raise NonFiniteLossError(
            f"validation loss is {scores[LOSS_MONITOR]} after epoch {epoch} (update {state.updates}): the weights "
            f"diverged; stopped. {_last_good(parts)}"
        )
    metric_name = cfg.eval.best_metric
    if hasattr(parts.scheduler, "observe"):  # plateau: mode "min" watches the loss, "max" the metric
        watch_metric = getattr(cfg.schedule, "mode", "min") == "max"
        parts.scheduler.observe(scores[metric_name] if watch_metric else scores[LOSS_MONITOR])
    _save_bests(
        eval_model, parts, state, epoch, scores, metric_name, resolve_mode(cfg.eval.mode, metric_name)
    )
    stop_cfg = cfg.early_stopping
    monitor = metric_name if stop_cfg.monitor == "best_metric" else stop_cfg.monitor
    _early_stopping(state, scores, monitor, resolve_mode(stop_cfg.mode, monitor), stop_cfg)
    return scores


def _check_window(window: list[torch.Tensor], epoch: int, updates: int, parts: Parts, progress) -> float:
    """Mean of the window's losses (one host sync); non-finite -> NonFiniteLossError naming the step."""
    if not window:
        return math.nan
    losses = torch.stack(window).float()
    finite = torch.isfinite(losses)
    if not bool(finite.all()):
        progress.close()
        first_bad = int((~finite).nonzero()[0])
        raise NonFiniteLossError(
            f"loss became {losses[first_bad].item()} at epoch {epoch + 1}, micro-batch {first_bad + 1} of the "
            f"log window ending at update {updates}; stopped (set train.nan_policy=skip to skip such steps, or "
            f"lower the learning rate). {_last_good(parts)}"
        )
    running = float(losses.mean().item())
    progress.describe(loss=running, lr=parts.scheduler.get_last_lr()[0])
    return running


def _last_good(parts: Parts) -> str:
    path = parts.checkpointer.latest("last") if parts.checkpointer is not None else None
    return f"The last good checkpoint is {path}." if path else "No checkpoint was saved yet."


def _save_bests(
    model, parts: Parts, state: TrainState, epoch: int, scores, metric_name: str, mode: str
) -> None:
    if metric_name not in scores:
        raise ValueError(
            f"eval.best_metric={metric_name!r} is not among the computed metrics {sorted(scores)}"
        )
    if is_improvement(scores[LOSS_MONITOR], state.best_loss, "min"):
        state.best_loss, state.best_loss_epoch = scores[LOSS_MONITOR], epoch
        if parts.checkpointer is not None:
            parts.checkpointer.save(
                "best_loss",
                model,
                epoch=epoch,
                value_name=LOSS_MONITOR,
                value=scores[LOSS_MONITOR],
                scores=scores,
                metrics=parts.metrics,
            )
    if is_improvement(scores[metric_name], state.best_metric, mode):
        state.best_metric, state.best_metric_epoch = scores[metric_name], epoch
        if parts.checkpointer is not None:
            parts.checkpointer.save(
                "best_metric",
                model,
                epoch=epoch,
                value_name=metric_name,
                value=scores[metric_name],
                scores=scores,
                metrics=parts.metrics,
            )


def _early_stopping(state: TrainState, scores, monitor: str, mode: str, stop_cfg) -> None:
    if not stop_cfg.enabled:
        return
    if monitor not in scores:
        raise ValueError(f"early_stopping.monitor={monitor!r} is not among {sorted(scores)}")
    if is_improvement(scores[monitor], state.early_stop_best, mode, stop_cfg.min_delta):
        state.early_stop_best, state.stale_evaluations = scores[monitor], 0
    else:
        state.stale_evaluations += 1
        state.stopped_early = state.stale_evaluations >= stop_cfg.patience


# ---------------------------------------------------------------------------------------------------------------
# Resume: everything random or stateful, as weights_only-loadable data.


def training_state(model, loaders: Loaders, parts: Parts, state: TrainState) -> dict[str, Any]:
    """The full training state to store in a `last` checkpoint (model weights are stored separately)."""
    result: dict[str, Any] = {
        "progress": asdict(state),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "precision": parts.precision.state_dict(),
        "loader": loaders.train.state_dict(),
        "rng": capture_rng_state(),
    }
    if parts.mixer is not None:
        result["mixer"] = parts.mixer.state_dict()
    if parts.ema is not None:
        result["ema"] = parts.ema.state_dict()
    return result


def restore_training_state(saved: dict[str, Any], loaders: Loaders, parts: Parts) -> TrainState:
    """Load a `training_state` dict into the parts; returns the TrainState to pass to ``fit``."""
    parts.optimizer.load_state_dict(saved["optimizer"])
    parts.scheduler.load_state_dict(saved["scheduler"])
    parts.precision.load_state_dict(saved["precision"])
    loaders.train.load_state_dict(saved["loader"])
    if parts.mixer is not None and "mixer" in saved:
        parts.mixer.load_state_dict(saved["mixer"])
    if parts.ema is not None and "ema" in saved:
        parts.ema.load_state_dict(saved["ema"])
    restore_rng_state(saved["rng"])
    return TrainState(**saved["progress"])


def make_loss(
    kind: str = "ce",
    *,
    num_classes: int,
    label_smoothing: float = 0.0,
    smoothing_style: str = "uniform",
    focal_gamma: float = 2.0,
    weight: torch.Tensor | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A ``loss(logits, target)`` accepting (N,) int64 or (N, C) soft targets, using trickbag.losses."""
    from trickbag import losses

    if kind not in ("ce", "focal"):
        raise ValueError(f"loss kind={kind!r} not in ('ce', 'focal')")

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        w = None if weight is None else weight.to(logits.device)
        if (
            not target.is_floating_point()
            and label_smoothing
            and (kind == "focal" or smoothing_style != "uniform")
        ):
            target = losses.smooth_labels(target, num_classes, label_smoothing, style=smoothing_style)
        if kind == "focal":
            return losses.focal_loss(logits, target, gamma=focal_gamma, alpha=w)
        if target.is_floating_point():
            return losses.soft_target_cross_entropy(logits, target, weight=w)
        return F.cross_entropy(logits.float(), target, weight=w, label_smoothing=label_smoothing)

    return loss_fn
