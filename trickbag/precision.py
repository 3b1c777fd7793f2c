"""Mixed precision as one small object: autocast + GradScaler + the optimizer step.

Master weights stay fp32: parameters, gradients and optimizer state keep their dtype (float32); autocast only
runs selected ops (matmuls, convolutions) in fp16/bf16. fp16 has a narrow exponent range, so small gradients
underflow to zero; the GradScaler multiplies the loss before ``backward`` and divides the gradients before the
step, skipping the step when that produced inf/NaN. bf16 has fp32's range and needs no scaler.

As in nanoGPT (``GradScaler(enabled=dtype == "float16")``) there is one code path for every policy: the
scaler is simply disabled for fp32 and bf16.

Decision for fp16 on CPU: allowed when this torch can run an fp16 autocast matmul on CPU (torch >= 2.3 can,
and has a CPU GradScaler); the scaler is used exactly as on CUDA. Otherwise it is refused with a ValueError.

``precision: auto`` (``resolve_policy``): on CUDA bf16 where the card has it, else fp16 with the GradScaler; on a
CPU bf16 only where a probe of the actual model (``trickbag.hardware.probe``) measured it faster than fp32, else
fp32. bf16 on a CPU without bf16 instructions (AVX2-only) is emulated and measured 70x slower, so an explicit
``bf16`` that the probe shows much slower gets one warning with the factor (``bf16_warning``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import torch

Policy = Literal["fp32", "fp16", "bf16"]
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# bf16 must beat fp32 by this factor to be chosen: a tie is noise, and fp32 is the safer numerics.
BF16_MIN_SPEEDUP = 1.1
# An explicit bf16 this many times slower than fp32 is warned about (emulated bf16 measured 70x here).
BF16_WARN_SLOWDOWN = 1.5


def _autocast_runs(device_type: str, dtype: torch.dtype) -> bool:
    """Whether a tiny matmul runs under autocast for this device type and dtype on this torch build."""
    try:
        with torch.autocast(device_type, dtype=dtype):
            x = torch.ones(2, 2, device=device_type)
            return (x @ x).dtype == dtype
    except (RuntimeError, ValueError):
        return False


def check_precision(policy: str, device: torch.device) -> None:
    """Raise ValueError when ``policy`` cannot work on ``device``, saying what to use instead."""
    if policy not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"precision policy {policy!r} is not one of ['fp32', 'fp16', 'bf16']")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available; use device='cpu'")
    if policy == "fp32":
        return
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"precision {policy!r} supports device types 'cpu' and 'cuda', got {device.type!r}")
    if policy == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"precision 'bf16' needs a GPU with bfloat16 support; {torch.cuda.get_device_name(device)} has none. "
            "Use precision='fp16' (with its GradScaler) or 'fp32'"
        )
    if not _autocast_runs(device.type, _DTYPES[policy]):
        raise ValueError(
            f"precision {policy!r} autocast does not run on {device.type} with torch {torch.__version__}; "
            "use precision='bf16' or 'fp32'"
        )


def resolve_policy(
    requested: str, device: torch.device | str, timings_ms: dict[str, float] | None = None
) -> str:
    """The policy to run: ``requested`` itself unless it is ``"auto"``.

    Args:
        requested: "auto", "fp32", "fp16" or "bf16".
        device: the run's device.
        timings_ms: CPU only, the probe's forward+backward milliseconds per policy: {"fp32": t, "bf16": t}
            (``trickbag.hardware.policy_times``); None or a missing entry: fp32.
    Returns:
        "auto" on CUDA: "bf16" where ``torch.cuda.is_bf16_supported()``, else "fp16"; on CPU: "bf16" when it
        measured at least ``BF16_MIN_SPEEDUP`` times faster than fp32, else "fp32"; other devices: "fp32".
    """
    if requested not in ("auto", "fp32", "fp16", "bf16"):
        raise ValueError(f"precision {requested!r} is not one of ['auto', 'fp32', 'fp16', 'bf16']")
    if requested != "auto":
        return requested
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type != "cpu" or not timings_ms or "fp32" not in timings_ms or "bf16" not in timings_ms:
        return "fp32"
    return "bf16" if timings_ms["fp32"] >= BF16_MIN_SPEEDUP * timings_ms["bf16"] else "fp32"


def bf16_warning(
    requested: str, device: torch.device | str, timings_ms: dict[str, float] | None
) -> str | None:
    """One warning line when an explicit ``bf16`` measured much slower than fp32 on this CPU, else None."""
    if requested != "bf16" or torch.device(device).type != "cpu" or not timings_ms:
        return None
    fp32, bf16 = timings_ms.get("fp32"), timings_ms.get("bf16")
    if fp32 is None or bf16 is None or not bf16 >= BF16_WARN_SLOWDOWN * fp32:
        return None
    return (
        f"warning: precision=bf16 is {bf16 / fp32:.1f}x slower than fp32 on this CPU (forward+backward of the "
        f"model: {bf16:.1f} ms vs {fp32:.1f} ms; it has no native bf16 instructions, so bf16 is emulated). "
        "Use precision=auto or precision=fp32"
    )


class Precision:
    """Autocast, loss scaling and the optimizer step for one precision policy on one device.

    Usage::

        precision = Precision("fp16", "cuda")
        with precision.autocast():
            loss = loss_fn(model(x), y)
        precision.backward(loss)
        if precision.step(optimizer, clip_grad_norm=1.0):
            ema.update(model)  # only when the weights really changed
        scheduler.step()  # every update, skipped or not, as torch's and timm's loops do
        optimizer.zero_grad(set_to_none=True)
    """

    def __init__(self, policy: Policy, device: torch.device | str):
        device = torch.device(device)
        check_precision(policy, device)
        self.policy = policy
        self.device = device
        self.uses_scaler = policy == "fp16"
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.uses_scaler)
        self.last_grad_norm: float | None = None  # total norm before clipping, when clipping was asked for

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context manager for the forward pass and the loss (a no-op for fp32)."""
        if self.policy == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[self.policy])

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, with the loss scaled first for fp16."""
        self.scaler.scale(loss).backward()

    def step(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        clip_grad_norm: float | None = None,
        parameters: Iterable[torch.Tensor] | None = None,
    ) -> bool:
        """Unscale (fp16), clip the gradient norm if asked, step the optimizer and update the scale.

        Args:
            clip_grad_norm: max total L2 norm of the gradients, ``> 0``; None: no clipping.
            parameters: the parameters whose norm is clipped; default: all of the optimizer's.
        Returns:
            True if the optimizer step really happened; False if the fp16 scaler skipped it because the
            gradients had inf/NaN (trickbag's trainer then still advances the schedule but not the EMA).
            Always True for fp32/bf16.
        """
        if clip_grad_norm is not None and not clip_grad_norm > 0:
            raise ValueError(f"clip_grad_norm must be > 0 or None, got {clip_grad_norm}")
        if clip_grad_norm is not None:
            self.scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            params = list(parameters) if parameters is not None else list(_parameters_of(optimizer))
            self.last_grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip_grad_norm))
        if not self.uses_scaler:
            optimizer.step()
            return True
        scale_before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        # update() lowers the scale exactly when inf/NaN gradients made step() skip the optimizer.
        return self.scaler.get_scale() >= scale_before

    def state_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("policy") != self.policy:
            raise ValueError(
                f"precision state was saved with policy={state.get('policy')!r}, this run uses {self.policy!r}"
            )
        if self.uses_scaler:
            self.scaler.load_state_dict(state["scaler"])


def _parameters_of(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    for group in optimizer.param_groups:
        yield from group["params"]
