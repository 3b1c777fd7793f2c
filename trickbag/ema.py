"""Exponential moving average of model weights (Polyak averaging), evaluated instead of the raw weights.

``ema = decay * ema + (1 - decay) * weights`` after every optimizer update. Buffers (BatchNorm running
statistics, ``num_batches_tracked``) are copied, not averaged: integer buffers cannot be averaged, and the
running statistics are already an average of their own.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_update(ema_tensors: list[torch.Tensor], tensors: list[torch.Tensor], decay: float) -> None:
    """In place: ``ema = decay * ema + (1 - decay) * tensor`` for each pair (float tensors, same shapes)."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"decay={decay!r} must be in (0, 1)")
    if ema_tensors:
        # lerp(ema, x, 1 - decay) == decay * ema + (1 - decay) * x, one fused kernel for all tensors.
        torch._foreach_lerp_(ema_tensors, tensors, 1.0 - decay)


class ModelEMA:
    """A frozen copy of ``model`` whose float parameters track an EMA of the training weights.

    Args:
        model: the model being trained (deep-copied once).
        decay: in (0, 1); 0.999 averages over roughly the last 1000 updates.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay={decay!r} must be in (0, 1)")
        self.decay = float(decay)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_params = [p for p in self.module.parameters() if p.dtype.is_floating_point]
        params = [p.detach() for p in model.parameters() if p.dtype.is_floating_point]
        ema_update(ema_params, params, self.decay)
        for ema_buffer, buffer in zip(self.module.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {key: value.detach().clone() for key, value in self.module.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
