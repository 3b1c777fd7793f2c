"""The training loop: ``fit(model, loaders, parts, options)``.

One readable loop, no base class and no hooks. ``parts`` is a plain dataclass holding the pieces the loop
composes (loss, optimizer, scheduler, precision, mixer, EMA, teacher, metrics, checkpointer, logger) and
``options`` a small plain dataclass (epochs, accumulation, clipping, evaluation and early-stopping settings).
Build them yourself, or with ``trickbag.run.build_run`` from a YAML config. The step is the seed's
zero_grad -> forward -> loss -> backward -> step, plus gradient accumulation, autocast, clipping and EMA.

Numbers that do not depend on how the data is batched:

* every reported loss is the dataset-level quantity ``sum_i w_i l_i / sum_i w_i`` (``w_i = 1`` without class
  weights), the same for any batch size and the same in training-time evaluation and ``trickbag eval``;
* ``accumulate`` micro-batches give the gradient of their union in one batch: each micro-batch back-propagates
  its weighted *sum* divided by a constant, and the gradients are rescaled by ``constant / sum of weights`` once
  the group is complete (a no-op without class weights when the micro-batches have equal sizes);
* ``nan_policy="skip"`` drops a non-finite micro-batch from its group (the others are still averaged exactly);
  a group whose micro-batches were all dropped does not step the optimizer, the schedule or the EMA.

Calling contract of the parts: ``scheduler.step()`` once per optimizer update, *including* an update the fp16
GradScaler skipped for inf/NaN gradients (as torch's and timm's loops do: the schedule keeps the run's clock,
so cosine and linear decays reach their end value; see the README), ``scheduler.observe(value)`` after each
evaluation; ``precision.step(...)`` returns False on a skipped step, and the EMA is then not updated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from trickbag import distributed
from trickbag.checkpoint import capture_rng_state, restore_rng_state
from trickbag.progress import Progress
from trickbag.runlog import RunLogger
from trickbag.tta import tta_logits, tta_probabilities

LOSS = "loss"  # key of the loss in evaluate()'s result; per-epoch rows prefix every score with "val_"


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf with ``nan_policy: stop``."""


@dataclass
class Loaders:
    train: Any  # iterable of (x, y) with len(); set_epoch() and state_dict() if it has them (BatchLoader)
    val: Any | None = None  # selection batches (x, y); None: no evaluation, only `last` checkpoints
    test: Any | None = None  # reported only, never used to choose anything (evaluated after fit)


@dataclass
class Parts:
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, int or soft target) -> mean
    optimizer: torch.optim.Optimizer
    scheduler: Any  # trickbag.schedules.Scheduler: step() per update, observe(metric), get_last_lr()
    precision: Any  # trickbag.precision.Precision
    metrics: Any | None = None  # trickbag.metrics.ClassificationMetrics
    mixer: Any | None = None  # trickbag.mixing.BatchMixer
    ema: Any | None = None  # trickbag.ema.ModelEMA
    teacher: nn.Module | None = None
    checkpointer: Any | None = None  # trickbag.checkpoint.Checkpointer
    logger: RunLogger = field(default_factory=RunLogger)
    freezer: Any | None = None  # trickbag.finetune.BackboneFreezer: set_epoch(epoch) at each epoch start


@dataclass
class EarlyStopping:
    """Stop after ``patience`` evaluations whose ``monitor`` did not improve by more than ``min_delta``."""

    patience: int = 5
    monitor: str = "best_metric"  # "best_metric" (FitOptions.best_metric), "loss" or a metric name
    min_delta: float = 0.0
    mode: str = "auto"  # "auto": "min" for losses, "max" for metrics


@dataclass
class FitOptions:
    """Everything ``fit`` needs besides the parts, as plain values (``trickbag.run.fit_options`` maps a config).

    ``best_metric`` names a key of ``evaluate()``'s result (``"loss"``, ``"accuracy"``, ``"macro_f1"``, ...):
    the ``best_metric`` checkpoint and, by default, early stopping follow it on the validation set.
    """

    epochs: int
    accumulate: int = 1
    clip_grad_norm: float | None = None
    nan_policy: str = "stop"  # "stop": raise NonFiniteLossError; "skip": drop that micro-batch
    log_every: int = 50  # optimizer updates between running-loss log lines
    eval_every_epochs: int = 1  # the last epoch is always evaluated
    flip_tta: bool = False
    translate_tta: bool = False  # with flip_tta: 4 views, after airbench (trickbag.tta)
    best_metric: str = "accuracy"
    best_mode: str = "auto"
    early_stopping: EarlyStopping | None = None
    plateau_watches: str = "loss"  # what a plateau schedule observes: "loss" or "best_metric"
    distill_alpha: float = 0.5  # weight of the distillation term when parts.teacher is set
    distill_temperature: float = 4.0

    def __post_init__(self) -> None:
        for name in ("epochs", "accumulate", "log_every", "eval_every_epochs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"FitOptions.{name}={value!r} must be an int >= 1")
        if self.nan_policy not in ("stop", "skip"):
            raise ValueError(f"FitOptions.nan_policy={self.nan_policy!r} not in ('stop', 'skip')")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ValueError(f"FitOptions.clip_grad_norm={self.clip_grad_norm!r} must be > 0 or None")
        if self.plateau_watches not in ("loss", "best_metric"):
            raise ValueError(
                f"FitOptions.plateau_watches={self.plateau_watches!r} not in ('loss', 'best_metric')"
            )
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise ValueError(f"FitOptions.distill_alpha={self.distill_alpha!r} must be in [0, 1]")
        resolve_mode(self.best_mode, self.best_metric)  # checks the mode name


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
    skipped_updates: int = 0  # groups whose micro-batches were all non-finite (nan_policy=skip)
    train_time_s: float = 0.0  # training + evaluation time of the completed epochs
    images: int = 0  # training images seen in the completed epochs
    history: list[dict[str, Any]] = field(default_factory=list)
    lr_trace: list[float] = field(default_factory=list)  # LR (param group 0) used by each optimizer update


# ---------------------------------------------------------------------------------------------------------------
# Small tested helpers


def accumulation_step(index: int, num_batches: int, accumulate: int) -> tuple[bool, bool, int]:
    """Where micro-batch ``index`` (0-based) of an epoch of ``num_batches`` sits in its accumulation group.

    Groups are consecutive runs of ``accumulate`` micro-batches; the last group of an epoch may be smaller and
    is still flushed (an update happens at the end of every epoch).

    Returns:
        (first, last, size): zero the gradients before it, step the optimizer after it, and the number of
        micro-batches in its group.
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
    if mode not in ("auto", "min", "max"):
        raise ValueError(f"mode={mode!r} not in ('auto', 'min', 'max')")
    if mode != "auto":
        return mode
    return "min" if "loss" in monitor else "max"


def loss_sums(loss_fn, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | int]:
    """(sum_i w_i l_i, sum_i w_i) of a batch: ``loss_fn.sums`` when it has one, else mean x N and N.

    A plain callable returning the batch mean is treated as unweighted (w_i = 1), which is exact for it.
    """
    if hasattr(loss_fn, "sums"):
        return loss_fn.sums(logits, target)
    count = int(target.shape[0])
    return loss_fn(logits, target) * count, count


def is_weighted(loss_fn) -> bool:
    """Whether the per-sample weights of ``loss_fn`` may differ from 1 (class weights)."""
    return hasattr(loss_fn, "sums") and getattr(loss_fn, "weight", None) is not None


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


@torch.inference_mode()
def evaluate(
    model,
    loader,
    loss_fn,
    metrics=None,
    *,
    precision=None,
    flip_tta: bool = False,
    translate_tta: bool = False,
) -> dict[str, float]:
    """Dataset-level loss and metrics of ``model`` on ``loader`` (eval mode, no gradients, optional TTA).

    The loss is ``sum_i w_i l_i / sum_i w_i`` over the whole set (accumulated in float64), so it does not
    depend on the batch size or on the order of the samples. A loader that is one rank's shard (its
    ``world_size`` > 1, e.g. ``BatchLoader(..., rank=r, world_size=W)``) has its sums and metric statistics
    added up over the ranks: every rank returns the scores of the whole set, each sample counted once.

    Returns:
        {"loss": float, **metrics.compute()} (numeric metrics only); loss is nan for an empty loader.
    """
    was_training = model.training
    model.eval()
    if metrics is not None:
        metrics.reset()
    numerator, denominator, seen = 0.0, 0.0, 0
    for x, y in loader:
        with precision.autocast() if precision is not None else contextlib.nullcontext():
            logits = tta_logits(model, x, flip=flip_tta, translate=translate_tta)
        batch_sum, batch_weight = loss_sums(loss_fn, logits.float(), y)
        numerator = numerator + batch_sum.double()
        denominator = denominator + (batch_weight.double() if torch.is_tensor(batch_weight) else batch_weight)
        seen += len(y)
        if metrics is not None:
            metrics.update(logits.softmax(1), y)  # probabilities: AUROC ranks them, not raw logits
    model.train(was_training)
    if getattr(loader, "world_size", 1) > 1:  # this rank saw its shard: add up every rank's statistics
        numerator, denominator, seen = distributed.reduce_loss_sums(numerator, denominator, seen)
        if metrics is not None:
            distributed.reduce_metric_state(metrics)
    result = {LOSS: float(numerator / denominator) if seen else math.nan}
    if metrics is not None and seen:
        for key, value in metrics.compute().items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                result[key] = float(value)
    return result


@torch.inference_mode()
def predict_probabilities(
    model, loader, *, precision=None, flip_tta: bool = False, translate_tta: bool = False
) -> torch.Tensor:
    """Class probabilities (N, C) float32 on the CPU for every batch ``(x, _)`` of ``loader``, in order."""
    was_training = model.training
    model.eval()
    probabilities = []
    for x, _ in loader:
        with precision.autocast() if precision is not None else contextlib.nullcontext():
            probabilities.append(tta_probabilities(model, x, flip=flip_tta, translate=translate_tta).cpu())
    model.train(was_training)
    return torch.cat(probabilities)


# ---------------------------------------------------------------------------------------------------------------
# The loop


def training_loss_sums(model, x, y, parts: Parts, options: FitOptions):
    """Forward + (weighted loss sum, weight sum) of one micro-batch; mixing, autocast, distillation included.

    With a teacher the objective is ``(1 - a) * loss + a * KD`` per sample; the KD term is weighted like the
    sample's loss (exact without class weights, and with them when the batch's weights are uniform).
    """
    if parts.mixer is not None:
        x, y = parts.mixer(x, y)
    with parts.precision.autocast():
        logits = model(x)
        total, weight = loss_sums(parts.loss_fn, logits, y)
        if parts.teacher is not None:
            from trickbag.losses import distillation_loss

            with torch.no_grad():
                teacher_logits = parts.teacher(x)
            kd = distillation_loss(logits, teacher_logits, temperature=options.distill_temperature, alpha=1.0)
            alpha = options.distill_alpha
            total = (1.0 - alpha) * total + alpha * kd * weight
    return total, weight


def fit(
    model: nn.Module, loaders: Loaders, parts: Parts, options: FitOptions, state: TrainState | None = None
) -> TrainState:
    """Train ``model`` for ``options.epochs`` epochs (continuing from ``state`` when resuming); returns the state.

    A state that stopped early returns at once (nothing more to train); see ``trickbag resume ... epochs=N``.
    """
    if not isinstance(options, FitOptions):
        raise TypeError(
            f"options must be a trickbag.train.FitOptions, got {type(options).__name__} "
            "(from a config: trickbag.run.fit_options(cfg))"
        )
    state = state or TrainState()
    log = parts.logger
    num_batches = len(loaders.train)
    if num_batches == 0:
        raise ValueError("the training loader yields no batches; lower batch_size or add data")
    if state.stopped_early or state.epoch >= options.epochs:
        return state
    params = [p for p in model.parameters() if p.requires_grad]
    weighted = is_weighted(parts.loss_fn)
    # Several processes (torchrun): DDP averages gradients, rank 0 alone writes. One process: none of this.
    ddp = distributed.is_distributed()
    train_model = model
    if ddp:
        if not distributed.all_ranks_agree(num_batches):
            raise ValueError(
                f"rank {distributed.rank()} has {num_batches} training batches but another rank has a "
                "different number: DDP steps all ranks together (use BatchLoader(rank=, world_size=, "
                "drop_last=True))"
            )
        train_model = distributed.wrap_ddp(model)
        if not distributed.is_main():
            log = RunLogger(quiet=True)
    progress = Progress(log, total=num_batches * (options.epochs - state.epoch))
    for epoch in range(state.epoch, options.epochs):
        started = time.perf_counter()
        model.train()
        if hasattr(loaders.train, "set_epoch"):  # a plain list of batches works too
            loaders.train.set_epoch(epoch)
        if parts.mixer is not None:
            parts.mixer.set_epoch(epoch)
        if hasattr(parts.loss_fn, "set_epoch"):  # deferred re-weighting switches its class weights by epoch
            parts.loss_fn.set_epoch(epoch)
        if parts.freezer is not None:  # fine-tuning: the head alone for the first epochs
            parts.freezer.set_epoch(epoch)
            params = [p for p in model.parameters() if p.requires_grad]
        if ddp:
            _seed_rank_streams(getattr(loaders.train, "seed", 0), epoch, parts)
        window, losses, images, skipped = [], [], 0, 0
        for index, (x, y) in enumerate(loaders.train):
            first, last, group_size = accumulation_step(index, num_batches, options.accumulate)
            if first:
                parts.optimizer.zero_grad(set_to_none=True)
                # Any constant works (the gradients are rescaled below); this one makes the rescale a no-op
                # for unweighted micro-batches of equal size, the common case.
                scale, kept_weight, kept_samples = float(len(x) * group_size), 0.0, 0
                if ddp:  # the same constant on every rank, whatever this rank's micro-batch holds
                    scale = float(getattr(loaders.train, "batch_size", len(x)) * group_size)
            # DDP all-reduces the gradients once per group: on its last micro-batch, not under no_sync.
            with train_model.no_sync() if ddp and not last else contextlib.nullcontext():
                total, weight = training_loss_sums(train_model, x, y, parts, options)
                # nan_policy=skip must look at every loss (one host sync per step); "stop" checks once per
                # log window. With DDP all ranks skip together (one verdict), or the all-reduce would hang.
                if options.nan_policy == "skip" and not (
                    distributed.all_finite(total) if ddp else torch.isfinite(total)
                ):
                    skipped += 1
                    reduced = not last
                else:
                    parts.precision.backward(total / scale)
                    if weighted:  # unweighted groups are normalised by the sample count (no tensor op)
                        kept_weight = kept_weight + (
                            weight.detach().float() if torch.is_tensor(weight) else weight
                        )
                    kept_samples += len(x)
                    window.append((total.detach(), weight))  # divided once per log window, not per step
                    reduced = True
            images += len(x)
            if last:
                if kept_samples == 0:  # every micro-batch of the group was non-finite: no update at all
                    state.skipped_updates += 1
                else:
                    if ddp:
                        _normalise_ddp_gradients(
                            params, scale, kept_weight if weighted else kept_samples, reduced
                        )
                    else:
                        _normalise_gradients(params, scale, kept_weight if weighted else kept_samples)
                    stepped = parts.precision.step(
                        parts.optimizer, clip_grad_norm=options.clip_grad_norm, parameters=params
                    )
                    state.lr_trace.append(parts.scheduler.get_last_lr()[0])
                    parts.scheduler.step()  # also after an fp16-skipped update: the schedule keeps the clock
                    if stepped and parts.ema is not None:
                        parts.ema.update(model)
                    state.updates += 1
                if state.updates % options.log_every == 0 or index == num_batches - 1:
                    running = _check_window(window, epoch, state.updates, parts, progress)
                    losses += [running] * len(window)
                    if window and state.updates % options.log_every == 0:
                        log.info(
                            f"epoch {epoch + 1} update {state.updates}: loss {running:.4f} lr {progress.lr}"
                        )
                    window = []
            progress.advance(images, started)
        if ddp:  # images of every rank (per-epoch throughput is the job's, not one process's)
            images = int(
                distributed.all_reduce_sum(torch.tensor([images], device=distributed.collective_device()))
            )
        if skipped:
            log.info(
                f"epoch {epoch + 1}: skipped {skipped} micro-batches with a non-finite loss (nan_policy=skip)"
            )
        row = {"epoch": epoch + 1, "train_loss": sum(losses) / len(losses) if losses else math.nan}
        if loaders.val is not None and (
            (epoch + 1) % options.eval_every_epochs == 0 or epoch + 1 == options.epochs
        ):
            scores = _evaluate_epoch(model, loaders, parts, options, state, epoch + 1, progress)
            row.update({f"val_{key}": value for key, value in scores.items()})
        row.update(lr=parts.scheduler.get_last_lr()[0], time_s=round(time.perf_counter() - started, 3))
        row["images_per_s"] = round(images / max(row["time_s"], 1e-9), 1)
        state.history.append(row)
        state.epoch = epoch + 1
        state.train_time_s += row["time_s"]
        state.images += images
        log.epoch(row, state.history)
        if hasattr(log, "lr_trace"):
            log.lr_trace(state.lr_trace)
        if parts.checkpointer is not None and distributed.is_main():
            parts.checkpointer.save(
                "last", model, state=training_state(model, loaders, parts, state), epoch=epoch + 1
            )
        if ddp:  # the others wait while rank 0 writes
            distributed.barrier()
        if state.stopped_early:
            log.info(
                f"early stopping after epoch {epoch + 1}: {options.early_stopping.patience} evaluations "
                "without improvement"
            )
            break
    progress.close()
    return state


def _normalise_gradients(params: list[torch.Tensor], scale: float, weight) -> None:
    """Turn the accumulated gradient of ``sum(w_i l_i) / scale`` into that of ``sum(w_i l_i) / sum(w_i)``."""
    if not torch.is_tensor(weight) and scale == weight:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    if torch.is_tensor(weight):  # class weights: stays on the device, no host sync
        factor = (scale / weight.clamp_min(torch.finfo(torch.float32).tiny)).to(grads[0].device)
        torch._foreach_mul_(grads, factor)
    else:
        torch._foreach_mul_(grads, scale / weight)


def _normalise_ddp_gradients(params: list[torch.Tensor], scale: float, weight, reduced: bool) -> None:
    """DDP's gradient is the mean over ranks of each rank's ``sum(w_i l_i) / scale``: turn it into the gradient
    of the union's ``sum(w_i l_i) / sum(w_i)`` (one all-reduce of the weights, kept on the device)."""
    if not reduced:  # the group's last micro-batch was skipped, so DDP reduced nothing: average here
        distributed.average_gradients(params)
    local = weight.reshape(1).float() if torch.is_tensor(weight) else torch.tensor([float(weight)])
    everyone = distributed.all_reduce_sum(local.to(distributed.collective_device()))
    _normalise_gradients(params, scale * distributed.world_size(), everyone[0])


def _evaluate_epoch(model, loaders: Loaders, parts: Parts, options: FitOptions, state, epoch: int, progress):
    """Evaluate on val (EMA weights if any), feed the plateau schedule, save best checkpoints, early stopping."""
    eval_model = parts.ema.module if parts.ema is not None else model
    if distributed.is_distributed():
        # Without SyncBatchNorm each rank's running statistics are its own: evaluate rank 0's, the checkpoint.
        distributed.broadcast_buffers(eval_model)
    scores = evaluate(eval_model, loaders.val, parts.loss_fn, parts.metrics, precision=parts.precision,
                      flip_tta=options.flip_tta, translate_tta=options.translate_tta)  # fmt: skip
    if not math.isfinite(scores[LOSS]):
        progress.close()
        raise NonFiniteLossError(
            f"validation loss is {scores[LOSS]} after epoch {epoch} (update {state.updates}): the weights "
            f"diverged; stopped. {_last_good(parts)}"
        )
    metric_name = options.best_metric
    if metric_name not in scores:
        raise ValueError(f"best_metric={metric_name!r} is not among the computed scores {sorted(scores)}")
    if hasattr(parts.scheduler, "observe"):  # plateau: the loss, or the best metric
        parts.scheduler.observe(
            scores[metric_name] if options.plateau_watches == "best_metric" else scores[LOSS]
        )
    _save_bests(
        eval_model, parts, state, epoch, scores, metric_name, resolve_mode(options.best_mode, metric_name)
    )
    stop = options.early_stopping
    if stop is not None:
        monitor = metric_name if stop.monitor == "best_metric" else stop.monitor
        _early_stopping(state, scores, monitor, resolve_mode(stop.mode, monitor), stop)
    return scores


def _seed_rank_streams(seed: int, epoch: int, parts: Parts) -> None:
    """DDP: dropout and mixing draw from streams of (seed, rank, epoch), so a resume with any number of
    processes re-derives them; the data order and crops/flips are the loader's (seed, epoch) plan."""
    rank = distributed.rank()
    torch.manual_seed(distributed.rank_seed(seed, rank, epoch))  # also seeds every CUDA device
    if parts.mixer is not None:
        parts.mixer.generator.manual_seed(distributed.rank_seed(seed + 1, rank, epoch))


def _check_window(window: list[tuple], epoch: int, updates: int, parts: Parts, progress) -> float:
    """Mean of the window's losses (one host sync); non-finite -> NonFiniteLossError naming the step.

    With several processes the window is every rank's: the same running loss and the same verdict on all.
    """
    if not window:
        return math.nan
    totals = torch.stack([total for total, _ in window]).float()
    weights = [weight for _, weight in window]
    weights = torch.stack(weights).float() if torch.is_tensor(weights[0]) else torch.tensor(weights)
    losses = totals / weights.to(totals.device)  # each micro-batch's mean loss
    if distributed.is_distributed():
        losses = distributed.all_gather_rows(losses.to(distributed.collective_device()))
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
    val_scores = {f"val_{key}": value for key, value in scores.items()}
    if not distributed.is_main():  # every rank keeps the same bests (scores are reduced); rank 0 writes
        parts = dataclasses.replace(parts, checkpointer=None)
    if is_improvement(scores[LOSS], state.best_loss, "min"):
        state.best_loss, state.best_loss_epoch = scores[LOSS], epoch
        if parts.checkpointer is not None:
            parts.checkpointer.save("best_loss", model, epoch=epoch, value_name="val_loss", value=scores[LOSS],
                                    scores=val_scores, metrics=parts.metrics)  # fmt: skip
    if is_improvement(scores[metric_name], state.best_metric, mode):
        state.best_metric, state.best_metric_epoch = scores[metric_name], epoch
        if parts.checkpointer is not None:
            parts.checkpointer.save("best_metric", model, epoch=epoch, value_name=f"val_{metric_name}",
                                    value=scores[metric_name], scores=val_scores, metrics=parts.metrics)  # fmt: skip


def _early_stopping(state: TrainState, scores, monitor: str, mode: str, stop: EarlyStopping) -> None:
    if monitor not in scores:
        raise ValueError(f"early stopping monitor={monitor!r} is not among {sorted(scores)}")
    if is_improvement(scores[monitor], state.early_stop_best, mode, stop.min_delta):
        state.early_stop_best, state.stale_evaluations = scores[monitor], 0
    else:
        state.stale_evaluations += 1
        state.stopped_early = state.stale_evaluations >= stop.patience


# ---------------------------------------------------------------------------------------------------------------
# Resume: everything random or stateful, as weights_only-loadable data.


def training_state(model, loaders: Loaders, parts: Parts, state: TrainState) -> dict[str, Any]:
    """The full training state to store in a `last` checkpoint (model weights are stored separately)."""
    result: dict[str, Any] = {
        "progress": asdict(state),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "precision": parts.precision.state_dict(),
        "loader": loaders.train.state_dict() if hasattr(loaders.train, "state_dict") else {},
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
    if hasattr(loaders.train, "load_state_dict"):
        loaders.train.load_state_dict(saved["loader"])
    if parts.mixer is not None and "mixer" in saved:
        parts.mixer.load_state_dict(saved["mixer"])
    if parts.ema is not None and "ema" in saved:
        parts.ema.load_state_dict(saved["ema"])
    restore_rng_state(saved["rng"])
    known = TrainState.__dataclass_fields__
    return TrainState(**{key: value for key, value in saved["progress"].items() if key in known})
