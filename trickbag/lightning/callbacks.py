"""Lightning callbacks for the tricks that only touch state: zero-γ, EMA weights, best checkpoints.

Each works with any LightningModule whose classifier is the attribute ``attribute`` (default ``"model"``, as
in ``TrickbagModule``); pass ``attribute=None`` to use the whole LightningModule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from trickbag.ema import ModelEMA
from trickbag.init import zero_init_residual_bn


def _network(pl_module: pl.LightningModule, attribute: str | None) -> nn.Module:
    if attribute is None:
        return pl_module
    network = getattr(pl_module, attribute, None)
    if not isinstance(network, nn.Module):
        raise ValueError(
            f"attribute={attribute!r}: {type(pl_module).__name__} has no nn.Module there; "
            "name the attribute holding the classifier, or pass attribute=None for the whole module"
        )
    return network


class ZeroInitResidualBN(Callback):
    """γ = 0 in the last BatchNorm of every residual block (``trickbag.init.zero_init_residual_bn``).

    Runs in ``setup("fit")``: before the optimizer is built and before a checkpoint is restored, so a resumed
    run keeps its trained γ. Only the first fit of this callback instance zeroes.
    """

    def __init__(self, attribute: str | None = "model") -> None:
        self.attribute = attribute
        self.zeroed: int | None = None  # how many BatchNorms were set, once done

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.zeroed is None:
            self.zeroed = zero_init_residual_bn(_network(pl_module, self.attribute))


class EMAWeights(Callback):
    """Keep an exponential moving average of the weights and validate / test with it.

    The average is updated after every real optimizer update (``pl_module.real_updates`` when the module
    counts them, as TrickbagModule does, else ``trainer.global_step``). During validation and test the EMA
    weights are swapped into the network and swapped out afterwards, so training continues from the raw
    weights and checkpoints hold the raw weights; the EMA is saved in this callback's state (restored on
    resume and by ``trainer.test(ckpt_path=...)``).

    Args:
        decay: in (0, 1); 0.999 averages over roughly the last 1000 updates.
        attribute: the LightningModule attribute holding the classifier, None for the module itself.
    """

    def __init__(self, decay: float = 0.999, attribute: str | None = "model") -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay={decay!r} must be in (0, 1)")
        self.decay = float(decay)
        self.attribute = attribute
        self.ema: ModelEMA | None = None
        self.updates_seen = 0
        self._pending: dict[str, torch.Tensor] | None = None
        self._raw: dict[str, torch.Tensor] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(decay=self.decay, attribute=self.attribute)

    def _ensure(self, pl_module: pl.LightningModule) -> ModelEMA | None:
        if self.ema is None and self._pending is not None:
            self.ema = ModelEMA(_network(pl_module, self.attribute), self.decay)
        if self.ema is not None and self._pending is not None:
            self.ema.load_state_dict(self._pending)
            self._pending = None
        return self.ema

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._ensure(pl_module) is None:
            self.ema = ModelEMA(_network(pl_module, self.attribute), self.decay)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        updates = getattr(pl_module, "real_updates", trainer.global_step)
        if updates > self.updates_seen and self.ema is not None:
            self.ema.update(_network(pl_module, self.attribute))
        self.updates_seen = updates

    def _swap_in(self, pl_module: pl.LightningModule) -> None:
        if self._ensure(pl_module) is None:
            return
        network = _network(pl_module, self.attribute)
        self._raw = {key: value.detach().clone() for key, value in network.state_dict().items()}
        network.load_state_dict(self.ema.module.state_dict())

    def _swap_out(self, pl_module: pl.LightningModule) -> None:
        if self._raw is not None:
            _network(pl_module, self.attribute).load_state_dict(self._raw)
            self._raw = None

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._swap_in(pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._swap_out(pl_module)

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._swap_in(pl_module)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._swap_out(pl_module)

    def state_dict(self) -> dict[str, Any]:
        ema = self.ema.state_dict() if self.ema is not None else self._pending
        return {"ema": ema, "updates_seen": self.updates_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.updates_seen = int(state_dict["updates_seen"])
        self._pending = state_dict["ema"]  # loaded into the EMA copy once the module is known


def best_checkpoints(
    dirpath: str | Path,
    *,
    metric: str = "val_accuracy",
    mode: str = "max",
    save_last: bool = True,
) -> list[ModelCheckpoint]:
    """Two ModelCheckpoints: best by ``val_loss``, and best by ``metric`` (plus ``last.ckpt``).

    One ModelCheckpoint watches one monitor; two instances have different ``state_key``s (monitor and mode are
    part of it), so Lightning restores each one's best score and path on resume. Keep their order: callbacks
    save in list order, so ``last.ckpt`` is written by the second one, after both have taken this
    validation into account (written by the first, it would hold the second's best of the epoch before).
    Files: ``best_loss-epoch003-val_loss=0.1234.ckpt``, ``best_metric-epoch005-val_accuracy=0.9861.ckpt``.
    """
    if mode not in ("min", "max"):
        raise ValueError(f"mode={mode!r} not in ('min', 'max')")
    if metric == "val_loss":
        raise ValueError(
            "metric='val_loss' is already watched by the best-loss checkpoint; name another metric"
        )
    best_loss = ModelCheckpoint(
        dirpath=dirpath,
        filename="best_loss-epoch{epoch:03d}-val_loss={val_loss:.4f}",
        monitor="val_loss",
        mode="min",
        auto_insert_metric_name=False,
    )
    best_metric = ModelCheckpoint(
        dirpath=dirpath,
        filename=f"best_metric-epoch{{epoch:03d}}-{metric}={{{metric}:.4f}}",
        monitor=metric,
        mode=mode,
        save_last=save_last,
        auto_insert_metric_name=False,
    )
    return [best_loss, best_metric]
