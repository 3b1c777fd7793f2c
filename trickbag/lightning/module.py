"""``TrickbagModule``: a LightningModule that trains any ``nn.Module`` classifier with trickbag's tricks.

What it wires, each from the trickbag part that holds the math:

* loss: cross-entropy or focal, label smoothing, class weights (``trickbag.losses``);
* batch mixing in ``training_step`` (MixUp / CutMix / FMix with soft targets, ``trickbag.mixing.BatchMixer``):
  Lightning callbacks cannot change the batch or the loss, so mixing has to live in the module;
* no-decay parameter groups and the linear LR scaling rule from the effective batch
  ``devices x batch_size x accumulate_grad_batches`` (``trickbag.optim``);
* trickbag's schedule (``trickbag.schedules.Scheduler``), stepped by the module itself in ``optimizer_step``
  once per optimizer update that really happened;
* validation / test metrics from ``trickbag.metrics.ClassificationMetrics``, synced across devices by their
  sufficient statistics (see ``trickbag.lightning.sync``), logged as ``val_loss``, ``val_accuracy``, ...

Why the schedule is not handed to Lightning (``configure_optimizers`` returns only the optimizer):
Lightning steps an ``interval="step"`` scheduler after every accumulation boundary whether or not the fp16
GradScaler skipped the update (inf/NaN gradients), so warmup and decay drift ahead of the real updates; and it
expects a ``torch.optim.lr_scheduler.LRScheduler``, which trickbag's pure ``lr_at(step)`` schedule is not.
``optimizer_step`` is called by Lightning exactly at accumulation boundaries (including the short last group
of an epoch), so stepping there and checking the scaler gives one schedule step per real update.
The schedule's state (and the mixer's) travel in the checkpoint under ``checkpoint["trickbag"]``.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from trickbag.lightning.sync import loss_sums, synced_metrics
from trickbag.losses import ClassifierLoss
from trickbag.metrics import ClassificationMetrics
from trickbag.mixing import BatchMixer
from trickbag.muon import Muon, muon_param_groups
from trickbag.optim import build_optimizer, param_groups, scale_lr
from trickbag.schedules import Scheduler

CHECKPOINT_KEY = "trickbag"


def effective_batch_size(batch_size: int, devices: int, accumulate_grad_batches: int) -> int:
    """Images per optimizer update: per-device batch x data-parallel devices x accumulated micro-batches."""
    for name, value in (
        ("batch_size", batch_size),
        ("devices", devices),
        ("accumulate_grad_batches", accumulate_grad_batches),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an int >= 1")
    return batch_size * devices * accumulate_grad_batches


class TrickbagModule(pl.LightningModule):
    """Train ``model`` (any ``nn.Module`` mapping (N, ...) inputs to (N, C) logits) with trickbag's tricks.

    Batches are ``(x, y)``: x (N, C, H, W) float (N, ...) when mixing is off, y (N,) int64 class indices.
    Subclass and override ``forward`` / ``training_step`` as usual; ``mix`` and ``criterion`` are plain
    attributes to call from your own step.

    Args:
        model: the classifier; stored as ``self.model`` (callbacks find it there).
        num_classes: C.
        loss: "ce" or "focal". label_smoothing / smoothing_style ("uniform", "off_target"), focal_gamma and
            class_weights ((C,) numbers) as in ``trickbag.losses``.
        mixup_alpha, cutmix_alpha, fmix_alpha, mix_prob, mix_mode ("batch" | "sample"), mix_off_epoch:
            ``trickbag.mixing.BatchMixer``; mixing is on when any alpha > 0. Label smoothing is then applied
            to the mixed soft targets, once.
        optimizer: "sgd", "adamw", "adam", "rmsprop" or "muon". lr is the LR for ``lr_batch_size`` images and
            is scaled linearly to the effective batch. batch_size: per-device batch; None reads
            ``batch_size`` from the training DataLoader. "muon": ``trickbag.muon.Muon`` on the model's hidden
            conv/linear weights (``muon_lr`` per update, ``muon_momentum``, ``muon_ns_steps``), SGD with
            lr / momentum / nesterov / weight_decay on the rest.
        weight_decay, no_decay_bias_norm: ``trickbag.optim.param_groups`` (no decay on biases and norms).
        schedule, warmup_epochs, schedule_options: ``trickbag.schedules.Scheduler(kind=schedule, ...)``;
            schedule_options holds the kind's own fields (e.g. {"eta_min": 0.0}, {"milestones": [30, 60]}).
        schedule_monitor: the logged value fed to ``Scheduler.observe`` after validation (plateau).
        top_k: extra top-k accuracies to report.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        *,
        loss: str = "ce",
        label_smoothing: float = 0.0,
        smoothing_style: str = "uniform",
        focal_gamma: float = 2.0,
        class_weights: list[float] | None = None,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        fmix_alpha: float = 0.0,
        mix_prob: float = 1.0,
        mix_mode: str = "batch",
        mix_off_epoch: int | None = None,
        mix_seed: int = 0,
        optimizer: str = "sgd",
        lr: float = 0.1,
        lr_batch_size: int = 256,
        batch_size: int | None = None,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 5e-4,
        no_decay_bias_norm: bool = True,
        muon_lr: float = 0.06,
        muon_momentum: float = 0.75,
        muon_ns_steps: int = 5,
        schedule: str = "cosine",
        warmup_epochs: float = 0.0,
        schedule_options: dict[str, Any] | None = None,
        schedule_monitor: str = "val_loss",
        top_k: list[int] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.num_classes = num_classes
        weight = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        self.criterion = ClassifierLoss(
            loss,
            num_classes=num_classes,
            label_smoothing=label_smoothing,
            smoothing_style=smoothing_style,
            focal_gamma=focal_gamma,
            weight=weight,
        )
        self.mix: BatchMixer | None = None
        if any(alpha != 0 for alpha in (mixup_alpha, cutmix_alpha, fmix_alpha)):  # BatchMixer rejects < 0
            self.mix = BatchMixer(
                num_classes=num_classes,
                mixup_alpha=mixup_alpha,
                cutmix_alpha=cutmix_alpha,
                fmix_alpha=fmix_alpha,
                prob=mix_prob,
                mode=mix_mode,
                label_smoothing=label_smoothing,
                smoothing_style=smoothing_style,
                off_epoch=mix_off_epoch,
                seed=mix_seed,
            )
        # Built in configure_optimizers, when the trainer knows the batch and the number of updates.
        self.scheduler: Scheduler | None = None
        self.real_updates = 0  # optimizer updates that happened (fp16-skipped and empty ones not counted)
        self._pending_state: dict[str, Any] | None = None
        metric_options = {"top_k": tuple(top_k or (1,)), "zero_division": 0.0}
        self.val_metrics = ClassificationMetrics(num_classes, **metric_options)
        self.test_metrics = ClassificationMetrics(num_classes, **metric_options)
        self._loss_totals: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    # ----------------------------------------------------------------------------------------- training

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.mix is not None:
            x, y = self.mix(x, y)  # y becomes (N, C) soft targets, label-smoothed by the mixer
        loss = self.criterion(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(x))
        return loss

    def on_train_epoch_start(self) -> None:
        if self.mix is not None:
            self.mix.set_epoch(self.current_epoch)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """Step the optimizer, then trickbag's schedule if the update really happened."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        scale_before = scaler.get_scale() if scaler is not None and scaler.is_enabled() else None
        losses = []

        def closure():
            loss = optimizer_closure()
            losses.append(loss)  # None: training_step returned None, so no backward and no real update
            return loss

        self.log("lr", optimizer.param_groups[0]["lr"], on_step=True, on_epoch=False)
        optimizer.step(closure=closure)
        # GradScaler.update() lowers the scale exactly when inf/NaN gradients made it skip optimizer.step().
        skipped = scale_before is not None and scaler.get_scale() < scale_before
        if losses and all(loss is not None for loss in losses) and not skipped:
            self.real_updates += 1
            if self.scheduler is not None:
                self.scheduler.step()

    def configure_optimizers(self):
        trainer = self.trainer
        hp = self.hparams
        trainer.estimated_stepping_batches  # noqa: B018 -- loads the train dataloader, so its size is known
        accumulate = trainer.accumulate_grad_batches
        batch = hp.batch_size if hp.batch_size is not None else self._loader_batch_size()
        effective = effective_batch_size(batch, trainer.world_size, accumulate)
        lr = scale_lr(hp.lr, effective, base_batch_size=hp.lr_batch_size)
        if hp.optimizer == "muon":
            groups = muon_param_groups(self, lr=lr, weight_decay=hp.weight_decay,
                                       no_decay_bias_norm=hp.no_decay_bias_norm)  # fmt: skip
            optimizer = Muon(groups, lr=lr, momentum=hp.momentum, nesterov=hp.nesterov,
                             weight_decay=hp.weight_decay, muon_lr=hp.muon_lr, muon_momentum=hp.muon_momentum,
                             ns_steps=hp.muon_ns_steps)  # fmt: skip
        else:
            groups = param_groups(self, hp.weight_decay, no_decay_bias_norm=hp.no_decay_bias_norm)
            optimizer = build_optimizer(
                hp.optimizer, groups, lr=lr, momentum=hp.momentum, nesterov=hp.nesterov
            )
        # Lightning flushes the short last accumulation group of an epoch, as trickbag's own loop does.
        steps_per_epoch = math.ceil(trainer.num_training_batches / accumulate)
        epochs = trainer.max_epochs
        if epochs is None or epochs < 1:
            if trainer.max_steps is None or trainer.max_steps < 1:
                raise ValueError(
                    "TrickbagModule needs Trainer(max_epochs=...) or max_steps to lay out the schedule"
                )
            epochs = math.ceil(trainer.max_steps / steps_per_epoch)
        self.scheduler = Scheduler(
            optimizer,
            hp.schedule,
            steps_per_epoch=steps_per_epoch,
            epochs=epochs,
            warmup_epochs=hp.warmup_epochs,
            **(hp.schedule_options or {}),
        )
        if self._pending_state is not None:
            self._restore(self._pending_state)
        return optimizer

    def _loader_batch_size(self) -> int:
        loader = self.trainer.train_dataloader
        batch = getattr(loader, "batch_size", None)
        if not isinstance(batch, int):
            raise ValueError(
                f"cannot read batch_size from the training dataloader ({type(loader).__name__}); "
                "pass TrickbagModule(batch_size=...) (the per-device batch)"
            )
        return batch

    # --------------------------------------------------------------------------------------- evaluation

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluation_step(batch, self.val_metrics)

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluation_step(batch, self.test_metrics)

    def on_validation_epoch_start(self) -> None:
        self.val_metrics.reset()
        self._loss_totals = []

    def on_test_epoch_start(self) -> None:
        self.test_metrics.reset()
        self._loss_totals = []

    def _evaluation_step(self, batch, metrics: ClassificationMetrics) -> None:
        x, y = batch
        logits = self(x).float()
        self._loss_totals.append(torch.stack(loss_sums(self.criterion, logits, y)).double())
        metrics.update(logits.softmax(1), y)  # probabilities: AUROC ranks them

    def on_validation_epoch_end(self) -> None:
        values = self._log_evaluation("val", self.val_metrics)
        fitting = self.trainer.state.fn == "fit" and not self.trainer.sanity_checking
        if fitting and self.scheduler is not None and values is not None:
            if self.hparams.schedule_monitor not in values:
                raise ValueError(
                    f"schedule_monitor={self.hparams.schedule_monitor!r} is not among the logged values "
                    f"{sorted(values)}"
                )
            self.scheduler.observe(values[self.hparams.schedule_monitor])

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test", self.test_metrics)

    def _log_evaluation(self, prefix: str, metrics: ClassificationMetrics) -> dict[str, float] | None:
        totals = (
            torch.stack(self._loss_totals).sum(0)
            if self._loss_totals
            else torch.zeros(2, dtype=torch.float64)
        )
        totals, merged = synced_metrics(
            metrics, totals.to(self.device), self.all_gather, self.trainer.world_size
        )
        if merged is None:  # no sample on any device
            return None
        values = {f"{prefix}_loss": float(totals[0] / totals[1])}
        values.update({f"{prefix}_{key}": float(value) for key, value in merged.compute().items()})
        # Values are already exact over all devices; sync_dist would average them again.
        self.log_dict(values, sync_dist=False, prog_bar=False)
        return values

    # --------------------------------------------------------------------------------------- checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "mixer": None if self.mix is None else self.mix.state_dict(),
            "real_updates": self.real_updates,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            return
        # Lightning restores the module before configure_optimizers builds the schedule: keep it until then.
        if self.scheduler is None:
            self._pending_state = state
        self._restore(state)

    def _restore(self, state: dict[str, Any]) -> None:
        self.real_updates = int(state["real_updates"])
        if self.mix is not None and state["mixer"] is not None:
            self.mix.load_state_dict(state["mixer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
            self._pending_state = None
