"""Exponential moving average of model weights (Polyak averaging), evaluated instead of the raw weights.

``ema = d * ema + (1 - d) * weights`` after every optimizer update, for the floating-point parameters that train
(``requires_grad=True``). Everything else is copied from the model at each update, not averaged:

* frozen parameters: a frozen backbone, or a stem set from data (e.g. a whitening layer initialised from the first
  batch) would otherwise be blended with its random initial value for thousands of updates;
* buffers (BatchNorm running statistics, ``num_batches_tracked``): integer buffers cannot be averaged, and the
  running statistics are already an average of their own.

With ``warmup=True`` the decay of update ``n`` (0-based: ``n`` updates came before it) is
``d = min(decay, (1 + n) / (10 + n))``, the ``num_updates`` rule of TensorFlow's ``ExponentialMovingAverage``
(https://www.tensorflow.org/api_docs/python/tf/train/ExponentialMovingAverage): the first update keeps only 10 %
of the initial weights, so a short run does not evaluate mostly-initial weights (with ``decay=0.999`` a fixed
decay still holds 37 % of them after 1000 updates).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

# The update count's key in state_dict(), next to the module's own keys: the state stays a flat dict of tensors
# (loads with weights_only=True, compares key by key). A model with a state key of this name is refused.
UPDATES_KEY = "ema_updates"


def ema_update(ema_tensors: list[torch.Tensor], tensors: list[torch.Tensor], decay: float) -> None:
    """In place: ``ema = decay * ema + (1 - decay) * tensor`` for each pair (float tensors, same shapes)."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"decay={decay!r} must be in (0, 1)")
    if ema_tensors:
        # lerp(ema, x, 1 - decay) == decay * ema + (1 - decay) * x, one fused kernel for all tensors.
        torch._foreach_lerp_(ema_tensors, tensors, 1.0 - decay)


def warmup_decay(decay: float, updates: int) -> float:
    """The decay of the update that follows ``updates`` earlier ones: ``min(decay, (1 + n) / (10 + n))``."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


def warmup_length(decay: float) -> int:
    """The number of updates after which :func:`warmup_decay` is ``decay`` itself."""
    # (1 + n) / (10 + n) >= decay  <=>  n >= (10 * decay - 1) / (1 - decay); the loop absorbs float rounding.
    updates = max(0, math.ceil((10.0 * decay - 1.0) / (1.0 - decay)) - 1)
    while warmup_decay(decay, updates) < decay:
        updates += 1
    return updates


class ModelEMA:
    """A frozen copy of ``model`` whose trainable float parameters track an EMA of the training weights.

    Args:
        model: the model being trained (deep-copied once; ``module`` is the averaged copy, in eval mode).
        decay: in (0, 1); 0.999 averages over roughly the last 1000 updates.
        warmup: start with a low decay that rises to ``decay`` (module docstring); False uses ``decay`` from the
            first update.
    """

    def __init__(self, model: nn.Module, decay: float, *, warmup: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay={decay!r} must be in (0, 1)")
        if not isinstance(warmup, bool):
            raise TypeError(f"warmup must be True or False, got {warmup!r}")
        self.decay = float(decay)
        self.warmup = warmup
        self.updates = 0  # optimizer updates averaged so far
        if UPDATES_KEY in model.state_dict():
            raise ValueError(
                f"the model has its own state key {UPDATES_KEY!r}, which ModelEMA.state_dict() uses"
            )
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @property
    def current_decay(self) -> float:
        """The decay the next :meth:`update` will use."""
        return warmup_decay(self.decay, self.updates) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Call after each optimizer update that really happened, with the model being trained."""
        averaged, targets, copied, sources = [], [], [], []
        # The training model's flags decide: the EMA copy itself is all requires_grad=False.
        for ema_tensor, tensor in _pairs(
            self.module.named_parameters(), model.named_parameters(), "parameter"
        ):
            if tensor.requires_grad and tensor.dtype.is_floating_point:
                averaged.append(ema_tensor)
                targets.append(tensor.detach())
            else:
                copied.append(ema_tensor)
                sources.append(tensor)
        for ema_tensor, tensor in _pairs(self.module.named_buffers(), model.named_buffers(), "buffer"):
            copied.append(ema_tensor)
            sources.append(tensor)
        ema_update(averaged, targets, self.current_decay)
        for ema_tensor, tensor in zip(copied, sources):
            ema_tensor.copy_(tensor)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged module's state plus ``UPDATES_KEY``: the update count as a 0-dim int64 tensor.

        Flat and all tensors, so it loads with ``torch.load(weights_only=True)`` and compares key by key.
        """
        state = {key: value.detach().clone() for key, value in self.module.state_dict().items()}
        state[UPDATES_KEY] = torch.tensor(self.updates, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a :meth:`state_dict`, or an older one without the count (its warm-up is then taken as over)."""
        state = dict(state)
        updates = state.pop(UPDATES_KEY, None)
        if updates is None:
            self.module.load_state_dict(state)
            self.updates = warmup_length(self.decay)
            return
        if not (
            isinstance(updates, torch.Tensor) and updates.numel() == 1 and not updates.is_floating_point()
        ):
            raise ValueError(
                f"EMA state {UPDATES_KEY!r} must be a one-element integer tensor, got {updates!r}"
            )
        if int(updates) < 0:
            raise ValueError(f"EMA state {UPDATES_KEY!r} must be >= 0, got {int(updates)}")
        self.module.load_state_dict(state)
        self.updates = int(updates)


def _pairs(ema_named, named, what: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    ema_named, named = list(ema_named), list(named)
    ema_names, names = [name for name, _ in ema_named], [name for name, _ in named]
    if ema_names != names:
        differing = sorted(set(ema_names) ^ set(names))[:5]
        raise ValueError(
            f"the model's {what}s do not match the EMA copy's (differing names: {differing}); "
            "pass the model the ModelEMA was built from"
        )
    return [(ema_tensor, tensor) for (_, ema_tensor), (_, tensor) in zip(ema_named, named)]
