"""Muon for the hidden conv/linear weights, SGD with momentum for every other parameter, in one optimizer.

Muon (Jordan et al. 2024) replaces a weight matrix's momentum update by its nearest semi-orthogonal matrix,
computed with a few Newton-Schulz iterations: every direction of the update moves by about the same amount,
instead of a few dominant ones. Conv filters are treated as (out_channels, in_channels * kh * kw) matrices. The
input layer and the classifier head are not hidden matrices and stay on SGD, as do biases and norm parameters
(Jordan's recommendation, and airbench94_muon's split).

airbench94_muon also rescales each Muon weight to the Frobenius norm ``sqrt(out_channels)`` before every step,
so the step is relative to the weight and weight decay has nothing to do. That is only harmless where the layer
feeds a normalization layer (BatchNorm makes it scale-invariant), which holds for every conv of trickbag's
``cifar_fast`` and the ResNets; ``normalize=False`` turns it off. On cifar10_fast (fp32, 3 epochs) it made the
difference: 80.1 % with it, 78.8 % without.

Usable without the Trainer::

    optimizer = Muon(muon_param_groups(model, lr=0.075, weight_decay=5e-4), lr=0.075, muon_lr=0.06)

References:
    Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks",
        https://kellerjordan.github.io/posts/muon/
    Jordan 2024, airbench94_muon (CIFAR-10 speedrun), https://github.com/KellerJordan/cifar10-airbench
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.optim.sgd import sgd as sgd_update

from trickbag.optim import choose_implementation, head_parameter_names, param_groups

# The quintic iteration's coefficients (Jordan et al.; the same as torch.optim.Muon): they maximise the slope at
# zero, so five steps bring every singular value into roughly [0.7, 1.2] instead of exactly 1.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(
    matrix: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32, method: str = "auto"
) -> torch.Tensor:
    """About ``U V^T`` of ``matrix = U S V^T`` (every singular value near 1), by ``steps`` Newton-Schulz steps.

    ``matrix``: 2-D; the iteration runs in ``dtype`` (bf16 is ~3x faster where the hardware has it, ~70x slower
    where it is emulated: the trainer passes the precision its probe chose) and the result has the input's dtype.
    A zero matrix stays zero.

    ``method``: "direct" iterates on the (m, n) matrix itself, m <= n after transposing (Jordan's code,
    ``2 m^2 n + m^3`` multiply-adds a step). "gram" iterates on the m x m Gram matrix only: every iterate is
    ``Q_k X`` with ``Q_k`` a polynomial in ``A = X X^T``, so ``X_k X_k^T = Q_k Q_k A`` and X is touched twice in
    all (``4 m^3`` a step, ``2 m^2 n`` once): a conv filter bank of 128 x (128 * 9) orthogonalizes in 1.2 ms
    instead of 2.8 on 2 CPU cores. It squares the condition number it works on: on gradient-like matrices
    (condition ~500) it is ~2 % off the exact iteration in fp32, where the direct form in bf16 (the usual choice
    on GPUs) is ~14 % off. "auto" takes it only in fp32/fp64 and where it needs fewer multiply-adds.
    """
    if matrix.ndim != 2:
        raise ValueError(f"orthogonalize needs a 2-D matrix, got shape {tuple(matrix.shape)}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if method not in ("auto", "direct", "gram"):
        raise ValueError(f"method must be 'auto', 'direct' or 'gram', got {method!r}")
    x = matrix.to(dtype)
    tall = x.shape[0] > x.shape[1]
    if tall:  # iterate on the wide orientation: the Gram matrix x @ x.T is then the smaller one
        x = x.T
    x = x / (x.norm() + 1e-7)  # spectral norm <= Frobenius norm <= 1: inside the iteration's basin
    m, n = x.shape
    if method == "auto":
        cheaper = 2 * m * m * n + 4 * m**3 * steps < steps * (2 * m * m * n + m**3)
        method = "gram" if cheaper and dtype in (torch.float32, torch.float64) else "direct"
    x = _newton_schulz_gram(x, steps) if method == "gram" else _newton_schulz_direct(x, steps)
    return (x.T if tall else x).to(matrix.dtype)


def _newton_schulz_direct(x: torch.Tensor, steps: int) -> torch.Tensor:
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x


def _newton_schulz_gram(x: torch.Tensor, steps: int) -> torch.Tensor:
    a, b, c = NS_COEFFICIENTS
    gram0 = x @ x.T
    q = None  # X_k = q @ x; q = identity before the first step
    for _ in range(steps):
        # X_k X_k^T = q gram0 q^T = q q gram0: q is a polynomial in gram0, so they commute (and q is symmetric)
        gram = gram0 if q is None else q @ (q @ gram0)
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        if q is None:
            q = poly + a * torch.eye(len(gram0), dtype=x.dtype, device=x.device)
        else:
            q = torch.addmm(q, poly, q, beta=a)
    return q @ x


def hidden_weight_names(model: nn.Module) -> list[str]:
    """The parameters Muon is for: every trainable weight with ``ndim >= 2`` except the first one (the input
    layer: the stem conv) and the classifier head's (:func:`trickbag.optim.head_parameter_names`)."""
    head = set(head_parameter_names(model))
    matrices = [name for name, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    return [name for name in matrices[1:] if name not in head]


def muon_param_groups(
    model: nn.Module, *, lr: float, weight_decay: float, no_decay_bias_norm: bool = True
) -> list[dict]:
    """:func:`trickbag.optim.param_groups` with the hidden weights moved into one group ``{"muon": True}``.

    The SGD groups keep their weight decay and get ``lr``; the Muon group's LR is the optimizer's ``muon_lr`` and
    it has no weight decay (Muon's rescaling fixes the weights' norm; pass your own groups to decay them).
    Raises ValueError when the model has no hidden weight (nothing for Muon to do: use SGD).
    """
    names = set(hidden_weight_names(model))
    if not names:
        raise ValueError(
            "optimizer 'muon': the model has no hidden conv/linear weight (every matrix is the input layer or "
            "the head); use name=sgd"
        )
    hidden = [p for name, p in model.named_parameters() if name in names]
    hidden_ids = {id(p) for p in hidden}
    groups = []
    for group in param_groups(model, weight_decay, no_decay_bias_norm=no_decay_bias_norm):
        rest = [p for p in group["params"] if id(p) not in hidden_ids]
        if rest:
            groups.append({**group, "params": rest, "lr": lr, "muon": False})
    groups.append({"name": "muon", "params": hidden, "weight_decay": 0.0, "muon": True})
    return groups


class Muon(torch.optim.Optimizer):
    """Muon for the groups marked ``"muon": True``, SGD (momentum, Nesterov, weight decay) for the others.

    A Muon group's update: ``buf = momentum * buf + grad``; ``g = grad + momentum * buf`` (Nesterov) or ``buf``;
    the weight rescaled to norm ``sqrt(out_channels)`` (``normalize``); ``w -= lr * orthogonalize(g)`` with ``g``
    flattened to (out, rest). Its group's default LR is ``muon_lr``, not ``lr``: Muon's step has a fixed size
    (every singular value ~1), so it does not follow the linear batch-size scaling of the SGD groups. A
    Scheduler scales each group from its own initial LR, so both follow the same schedule.

    Args:
        params: param groups, e.g. from :func:`muon_param_groups` (a group without ``"muon"`` is an SGD one).
        lr / momentum / nesterov / weight_decay: the SGD groups' defaults, as ``torch.optim.SGD``.
        muon_lr / muon_momentum: the Muon groups' defaults (airbench94_muon: 0.6 at batch 2000; at batch 128 on
            cifar10_fast 0.75 scored +0.46 points over 0.6 in 3 paired seeds, 0.45 and 0.85 less).
        ns_steps: Newton-Schulz steps; ns_dtype: their precision (float32, or bfloat16 where it is fast).
        normalize: rescale each Muon weight before its step (only for layers that feed a norm layer).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        *,
        lr: float,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        muon_lr: float = 0.06,
        muon_momentum: float = 0.75,
        ns_steps: int = 5,
        ns_dtype: torch.dtype = torch.float32,
        normalize: bool = True,
    ) -> None:
        for name, value in (("lr", lr), ("muon_lr", muon_lr)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        for name, value in (("momentum", momentum), ("muon_momentum", muon_momentum)):
            if not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        if not isinstance(ns_steps, int) or isinstance(ns_steps, bool) or ns_steps < 1:
            raise ValueError(f"ns_steps must be an int >= 1, got {ns_steps!r}")
        # Per-group values; the Muon groups get theirs from muon_* below (a group's own value wins in both).
        defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay,
                    "muon": False}  # fmt: skip
        groups = list(params)
        if groups and isinstance(groups[0], dict):
            groups = [
                {"lr": muon_lr, "momentum": muon_momentum, **group} if group.get("muon") else group
                for group in groups
            ]
        super().__init__(groups, defaults)
        self.ns_steps, self.ns_dtype, self.normalize = ns_steps, ns_dtype, normalize

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if group["muon"]:
                self._muon_step(group, params)
            else:
                # The SGD groups take torch's fused / foreach kernel where it has one (a for-loop of small ops
                # was ~0.15 ms of a 20 ms CPU step; the fused kernel 0.01).
                chosen = choose_implementation("sgd", params)
                buffers = [self.state[p].get("momentum_buffer") for p in params]
                sgd_update(
                    params, [p.grad for p in params], buffers,
                    fused=chosen == "fused", foreach=chosen == "foreach",
                    weight_decay=group["weight_decay"], momentum=group["momentum"], lr=group["lr"],
                    dampening=0.0, nesterov=group["nesterov"], maximize=False,
                )  # fmt: skip
                for p, buffer in zip(params, buffers):
                    self.state[p]["momentum_buffer"] = buffer
        return loss

    def _muon_step(self, group: dict, params: list[torch.Tensor]) -> None:
        momentum, lr = group["momentum"], group["lr"]
        grads = [p.grad for p in params]
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        buffers = [self.state[p]["momentum_buffer"] for p in params]
        # Elementwise work as one multi-tensor op per stage (fewer small kernels: the step is latency-bound on CPU).
        torch._foreach_mul_(buffers, momentum)
        torch._foreach_add_(buffers, grads)
        updates = torch._foreach_add(grads, buffers, alpha=momentum) if group["nesterov"] else buffers
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        if self.normalize:
            norms = torch._foreach_norm(params)
            torch._foreach_mul_(params, [len(p) ** 0.5 / (norm + 1e-12) for p, norm in zip(params, norms)])
        directions = [
            _from_matrix(orthogonalize(_as_matrix(update), self.ns_steps, self.ns_dtype), like=update)
            for update in updates
        ]
        torch._foreach_add_(params, directions, alpha=-lr)


def _as_matrix(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as (rows, rest), its columns in memory order: a view for contiguous and channels_last filters.

    Orthogonalization commutes with permuting columns (the polar factor of ``X P`` is that of ``X`` times ``P``),
    so a channels_last filter bank can be flattened as (out, kh, kw, in) without a copy; the direction goes back
    the same way, with the parameter's own strides (saves a copy and a strided add: ~0.1-0.3 ms of a ~4 ms Muon
    step for cifar_fast on 2 cores).
    """
    if _is_channels_last(tensor):
        return tensor.permute(0, 2, 3, 1).reshape(len(tensor), -1)
    return tensor.reshape(len(tensor), -1)


def _from_matrix(matrix: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if _is_channels_last(like):
        out, channels, height, width = like.shape
        return matrix.view(out, height, width, channels).permute(0, 3, 1, 2)
    return matrix.view_as(like)


def _is_channels_last(tensor: torch.Tensor) -> bool:
    return (
        tensor.ndim == 4
        and not tensor.is_contiguous()
        and tensor.is_contiguous(memory_format=torch.channels_last)
    )
