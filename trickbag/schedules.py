"""Learning-rate schedules: constant, linear, step, multistep, cosine, SGDR restarts and reduce-on-plateau,
each with an optional linear warmup, from plain arguments.

Schedules are pure: :func:`schedule_lr` maps an optimizer-update count to a learning rate, and
:class:`Scheduler` is the one place that writes ``param_group["lr"]``::

    scheduler = Scheduler(optimizer, "cosine", warmup_epochs=1, steps_per_epoch=390, epochs=30)

Calling contract of the Scheduler:

* ``step()`` once per optimizer update that really happened (not per micro-batch, and not when the fp16
  GradScaler skipped the update);
* ``observe(metric)`` after each evaluation (only ``kind="plateau"`` uses it; the metric's direction must
  match ``mode``: "min" for a loss, "max" for an accuracy);
* the epoch is derived as ``updates // steps_per_epoch``, so ``steps_per_epoch`` must be the number of optimizer
  updates per epoch (updates skipped by the fp16 scaler, usually a few at the start, delay the epoch
  boundaries of ``interval="epoch"`` by as many updates).

Durations are given in epochs (``step_size``, ``milestones``, ``t_0``, ``warmup_epochs``) or in optimizer updates
(the ``*_steps`` arguments). With ``interval="update"`` the LR changes after every update; with
``interval="epoch"`` only at epoch boundaries, and without warmup the LRs then equal those of
``torch.optim.lr_scheduler.StepLR / MultiStepLR / CosineAnnealingLR / CosineAnnealingWarmRestarts /
ReduceLROnPlateau`` stepped once per epoch.

Warmup multiplies the schedule by ``start + (1 - start) * t / warmup`` for ``t < warmup`` (``t`` in updates, or
in epochs with ``interval="epoch"``); the main schedule keeps its absolute clock, so milestones stay where they
are written and cosine still ends at the end of the run.

This module takes plain values only; the YAML ``schedule:`` section (``trickbag.config.ScheduleConfig``) maps
onto the same argument names with ``trickbag.config.build_scheduler``.

References: Loshchilov & Hutter 2016, SGDR, https://arxiv.org/abs/1608.03983; Goyal et al. 2017 (warmup),
https://arxiv.org/abs/1706.02677
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import numbers
import typing
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch

ScheduleKind = Literal["constant", "linear", "step", "multistep", "cosine", "cosine_restarts", "plateau"]
SCHEDULE_KINDS: tuple[str, ...] = typing.get_args(ScheduleKind)
_CHOICES = {
    "kind": SCHEDULE_KINDS,
    "interval": ("update", "epoch"),
    "mode": ("min", "max"),
    "threshold_mode": ("rel", "abs"),
}
# name: (test, what is allowed, must be an int, None allowed). NaN fails every test.
_RANGES = {
    "warmup_epochs": (lambda v: v >= 0, "a number >= 0", False, False),
    "warmup_steps": (lambda v: v >= 0, "an int >= 0 or None", True, True),
    "warmup_start_factor": (lambda v: 0 <= v <= 1, "a number in [0, 1]", False, False),
    "step_size": (lambda v: v > 0, "a number > 0 or None", False, True),
    "step_size_steps": (lambda v: v > 0, "an int > 0 or None", True, True),
    "gamma": (lambda v: v > 0, "a number > 0", False, False),
    "eta_min": (lambda v: v >= 0, "a number >= 0", False, False),
    "t_0": (lambda v: v > 0, "a number > 0 or None", False, True),
    "t_0_steps": (lambda v: v > 0, "an int > 0 or None", True, True),
    "t_mult": (lambda v: v >= 1, "an int >= 1", True, False),
    "end_factor": (lambda v: v >= 0, "a number >= 0", False, False),
    "factor": (lambda v: 0 < v < 1, "a number in (0, 1)", False, False),
    "patience": (lambda v: v >= 0, "an int >= 0", True, False),
    "threshold": (lambda v: v >= 0, "a number >= 0", False, False),
    "cooldown": (lambda v: v >= 0, "an int >= 0", True, False),
    "min_lr": (lambda v: v >= 0, "a number >= 0", False, False),
}
_COMMON_FIELDS = {"kind", "interval", "warmup_epochs", "warmup_steps", "warmup_start_factor"}
_KIND_FIELDS = {
    "constant": set(),
    "linear": {"end_factor"},
    "step": {"step_size", "step_size_steps", "gamma"},
    "multistep": {"milestones", "milestones_steps", "gamma"},
    "cosine": {"eta_min"},
    "cosine_restarts": {"t_0", "t_0_steps", "t_mult", "eta_min"},
    "plateau": {"mode", "factor", "patience", "threshold", "threshold_mode", "cooldown", "min_lr"},
}
# (epochs field, updates field) pairs: exactly one must be given for the kinds that use them.
_DURATION_PAIRS = {
    "step": ("step_size", "step_size_steps"),
    "multistep": ("milestones", "milestones_steps"),
    "cosine_restarts": ("t_0", "t_0_steps"),
}
_UPDATE_FIELDS = ("warmup_steps", "step_size_steps", "milestones_steps", "t_0_steps")
_PLATEAU_EPS = 1e-8  # torch's ReduceLROnPlateau default: reductions smaller than this are ignored


# ---------------------------------------------------------------------------------------------------------------
# Arguments


@dataclasses.dataclass(frozen=True)
class ScheduleSpec:
    """Every argument of a schedule, checked on construction (all problems in one ValueError).

    The arguments of :class:`Scheduler` (names and defaults; see there). Durations are in epochs, or in
    optimizer updates for the ``*_steps`` fields; milestones are stored as tuples.
    """

    kind: str = "cosine"
    interval: str = "update"  # "update": the LR changes after every update; "epoch": at epoch boundaries
    warmup_epochs: float = 0.0
    warmup_steps: int | None = None
    warmup_start_factor: float = 0.1  # warmup starts at this fraction of the LR
    step_size: float | None = None  # step: decay every step_size epochs
    step_size_steps: int | None = None
    milestones: tuple[float, ...] | None = None  # multistep: epochs at which the LR is multiplied by gamma
    milestones_steps: tuple[int, ...] | None = None
    gamma: float = 0.1
    eta_min: float = 0.0  # cosine / cosine_restarts: final LR (absolute)
    t_0: float | None = None  # cosine_restarts: length of the first cycle in epochs
    t_0_steps: int | None = None
    t_mult: int = 1  # each cycle is t_mult times longer than the previous one
    end_factor: float = 0.0  # linear: LR at the end of the run, as a fraction of the base LR
    mode: str = "min"  # plateau: whether the observed metric should go down ("min") or up ("max")
    factor: float = 0.1
    patience: int = 10
    threshold: float = 1e-4
    threshold_mode: str = "rel"
    cooldown: int = 0
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        for name in ("milestones", "milestones_steps"):
            value = getattr(self, name)
            if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
                object.__setattr__(self, name, tuple(value))  # hashable, and safe from later edits
        problems = schedule_problems(self)
        if problems:
            raise ValueError("; ".join(problems))


SCHEDULE_DEFAULTS: dict[str, Any] = {field.name: field.default for field in dataclasses.fields(ScheduleSpec)}


def schedule_problems(spec: Any) -> list[str]:
    """Every problem of the schedule arguments in ``spec`` (any object with the ScheduleSpec attribute names).

    Ranges and choices first, then the rules between arguments: an argument that does not apply to the kind
    may only keep its default; exactly one of the epoch / update forms of a kind's duration; no update counts
    with ``interval="epoch"``; milestones non-empty and > 0.
    """
    problems = []
    for name, choices in _CHOICES.items():
        value = getattr(spec, name)
        if not isinstance(value, str) or value not in choices:
            problems.append(f"{name}={value!r} is not one of {list(choices)}")
    for name, (test, allowed, integer, optional) in _RANGES.items():
        value = getattr(spec, name)
        if value is None and optional:
            continue
        kind_ok = isinstance(value, numbers.Integral if integer else numbers.Real) and not isinstance(
            value, bool
        )
        if not (kind_ok and math.isfinite(value) and test(value)):
            problems.append(f"{name} must be {allowed}, got {value!r}")
    if problems and any(problem.startswith(("kind=", "interval=")) for problem in problems):
        return problems  # the rules below need a valid kind and interval

    allowed_fields = _COMMON_FIELDS | _KIND_FIELDS[spec.kind]
    for name in sorted(set(SCHEDULE_DEFAULTS) - allowed_fields):
        if getattr(spec, name) != SCHEDULE_DEFAULTS[name]:  # a default is "not given", so dumps round-trip
            users = [kind for kind, fields in _KIND_FIELDS.items() if name in fields]
            problems.append(
                f"{name} does not apply to kind={spec.kind!r} (it is used by kind {' / '.join(users)})"
            )
    if spec.warmup_epochs != 0 and spec.warmup_steps is not None:
        problems.append("give warmup_epochs or warmup_steps, not both")
    if spec.interval == "epoch":
        for name in _UPDATE_FIELDS:
            if getattr(spec, name) is not None:
                problems.append(
                    f"{name} counts optimizer updates but interval='epoch'; "
                    f"use {name.removesuffix('_steps')} (epochs) or interval='update'"
                )
    if spec.kind in _DURATION_PAIRS:
        in_epochs, in_steps = _DURATION_PAIRS[spec.kind]
        given = [name for name in (in_epochs, in_steps) if getattr(spec, name) is not None]
        if len(given) != 1:
            problems.append(f"kind={spec.kind!r} needs exactly one of {in_epochs} or {in_steps}, got {given}")
    for name, number_type in (("milestones", numbers.Real), ("milestones_steps", numbers.Integral)):
        values = getattr(spec, name)
        if values is None:
            continue
        if not (
            isinstance(values, (list, tuple))
            and values
            and all(isinstance(v, number_type) and not isinstance(v, bool) for v in values)
            and all(math.isfinite(v) and v > 0 for v in values)
        ):
            shown = list(values) if isinstance(values, (list, tuple)) else values
            kind_of_number = "ints" if number_type is numbers.Integral else "numbers"
            problems.append(f"{name} must be a non-empty list of {kind_of_number} > 0, got {shown}")
    return problems


# ---------------------------------------------------------------------------------------------------------------
# Pure schedule math


@dataclasses.dataclass(frozen=True)
class ResolvedSchedule:
    """A ScheduleSpec with every duration converted to its clock: updates, or epochs if ``per_epoch``."""

    kind: str
    steps_per_epoch: int
    per_epoch: bool
    total: float  # length of the run
    warmup: float
    warmup_start_factor: float
    step_size: float = 1.0
    milestones: tuple[float, ...] = ()
    gamma: float = 0.1
    eta_min: float = 0.0
    t_0: float = 1.0
    t_mult: int = 1
    end_factor: float = 0.0


def resolve_schedule(spec: ScheduleSpec, *, steps_per_epoch: int, epochs: int) -> ResolvedSchedule:
    """Convert the durations of ``spec`` to the clock of its interval (updates or epochs)."""
    if not isinstance(spec, ScheduleSpec):
        raise TypeError(f"spec must be a ScheduleSpec, got {type(spec).__name__}")
    for name, value in (("steps_per_epoch", steps_per_epoch), ("epochs", epochs)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    per_epoch = spec.interval == "epoch"
    scale = 1 if per_epoch else steps_per_epoch

    def duration(in_epochs: float | None, in_steps: int | None, minimum: int = 1) -> float:
        if in_steps is not None:
            return in_steps
        if in_epochs is None:
            return minimum
        # Per-update clocks count whole updates; per-epoch clocks may keep fractional epochs.
        return in_epochs if per_epoch else max(minimum, round(in_epochs * scale))

    if spec.milestones_steps is not None:
        milestones = tuple(sorted(spec.milestones_steps))
    else:
        milestones = tuple(sorted(duration(m, None) for m in spec.milestones or ()))
    return ResolvedSchedule(
        kind=spec.kind,
        steps_per_epoch=steps_per_epoch,
        per_epoch=per_epoch,
        total=epochs * scale,
        warmup=duration(spec.warmup_epochs, spec.warmup_steps, minimum=0),
        warmup_start_factor=spec.warmup_start_factor,
        step_size=duration(spec.step_size, spec.step_size_steps),
        milestones=milestones,
        gamma=spec.gamma,
        eta_min=spec.eta_min,
        t_0=duration(spec.t_0, spec.t_0_steps),
        t_mult=spec.t_mult,
        end_factor=spec.end_factor,
    )


def schedule_lr(
    schedule: ResolvedSchedule, step: int, base_lr: float, plateau_lr: float | None = None
) -> float:
    """Learning rate for optimizer update number ``step`` (0-based) of a group whose base LR is ``base_lr``.

    ``plateau_lr`` is the group's current reduced LR for ``kind="plateau"`` (see :func:`plateau_observe`).
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    t = step // schedule.steps_per_epoch if schedule.per_epoch else step
    s = schedule
    if s.kind == "plateau":
        lr = base_lr if plateau_lr is None else plateau_lr
    elif s.kind == "constant":
        lr = base_lr
    elif s.kind == "linear":
        lr = base_lr * (1.0 + (s.end_factor - 1.0) * min(t, s.total) / s.total)
    elif s.kind == "step":
        decays = int(t // s.step_size)
        # Repeated products, as torch's StepLR does, so the LRs match it bit for bit (pow for long runs).
        lr = base_lr * s.gamma**decays if decays > 1000 else base_lr
        for _ in range(decays if decays <= 1000 else 0):
            lr *= s.gamma
    elif s.kind == "multistep":
        lr = base_lr
        passed = Counter(s.milestones[: bisect.bisect_right(s.milestones, t)])
        for milestone in sorted(passed):
            lr *= s.gamma ** passed[milestone]  # as MultiStepLR: one product per distinct milestone
    elif s.kind == "cosine":
        lr = s.eta_min + (base_lr - s.eta_min) * (1.0 + math.cos(math.pi * min(t, s.total) / s.total)) / 2.0
    elif s.kind == "cosine_restarts":
        t_cur, t_i = t, s.t_0
        if s.t_mult == 1:
            t_cur = t % s.t_0
        else:
            while t_cur >= t_i:
                t_cur, t_i = t_cur - t_i, t_i * s.t_mult
        lr = s.eta_min + (base_lr - s.eta_min) * (1.0 + math.cos(math.pi * t_cur / t_i)) / 2.0
    else:
        raise ValueError(f"unknown schedule kind {s.kind!r}")
    if t < s.warmup:
        lr *= s.warmup_start_factor + (1.0 - s.warmup_start_factor) * t / s.warmup
    return lr


@dataclasses.dataclass(frozen=True)
class PlateauState:
    """Reduce-on-plateau counters, as in torch's ReduceLROnPlateau."""

    lrs: tuple[float, ...]  # current (reduced) LR per param group, before warmup
    best: float
    num_bad_epochs: int = 0
    cooldown_counter: int = 0
    num_observations: int = 0


def plateau_start(spec: ScheduleSpec, base_lrs: list[float]) -> PlateauState:
    return PlateauState(
        lrs=tuple(float(lr) for lr in base_lrs), best=math.inf if spec.mode == "min" else -math.inf
    )


def plateau_is_better(metric: float, best: float, spec: ScheduleSpec) -> bool:
    if spec.mode == "min":
        return metric < (
            best * (1.0 - spec.threshold) if spec.threshold_mode == "rel" else best - spec.threshold
        )
    return metric > (best * (1.0 + spec.threshold) if spec.threshold_mode == "rel" else best + spec.threshold)


def plateau_observe(state: PlateauState, metric: float, spec: ScheduleSpec) -> PlateauState:
    """The state after one evaluation with value ``metric`` (same rules as ReduceLROnPlateau.step).

    A NaN metric counts as "not better", as in torch.
    """
    metric = float(metric)
    best, num_bad, cooldown, lrs = state.best, state.num_bad_epochs + 1, state.cooldown_counter, state.lrs
    if plateau_is_better(metric, best, spec):
        best, num_bad = metric, 0
    if cooldown > 0:
        cooldown, num_bad = cooldown - 1, 0  # bad epochs during cooldown do not count
    if num_bad > spec.patience:
        reduced = [max(lr * spec.factor, spec.min_lr) for lr in lrs]
        lrs = tuple(new if old - new > _PLATEAU_EPS else old for old, new in zip(lrs, reduced))
        cooldown, num_bad = spec.cooldown, 0
    return PlateauState(lrs, best, num_bad, cooldown, state.num_observations + 1)


# ---------------------------------------------------------------------------------------------------------------
# Scheduler: the one place that writes param_group["lr"]


class Scheduler:
    """Drives an optimizer's learning rates (calling contract: module docstring).

    Each param group keeps its own base LR (its ``initial_lr``, else its ``lr`` at construction).

    Args:
        optimizer: any ``torch.optim.Optimizer``; build the Scheduler after its last ``add_param_group``.
        kind: "constant", "linear", "step", "multistep", "cosine", "cosine_restarts" or "plateau".
        steps_per_epoch: optimizer updates per epoch (not micro-batches), ``>= 1``.
        epochs: length of the run, ``>= 1``; cosine and linear end there.
        interval: "update" (the LR changes after every update) or "epoch" (at epoch boundaries only, as torch's
            schedulers stepped once per epoch).
        warmup_epochs / warmup_steps: linear warmup length, in epochs or in updates (give at most one).
        warmup_start_factor: the warmup starts at this fraction of the LR, in [0, 1].
        step_size / step_size_steps: step: multiply by ``gamma`` every this many epochs / updates (exactly one).
        milestones / milestones_steps: multistep: multiply by ``gamma`` at these epochs / updates (exactly one).
        gamma: step / multistep decay factor, ``> 0``.
        eta_min: cosine / cosine_restarts: final absolute LR, ``>= 0``.
        t_0 / t_0_steps: cosine_restarts: first cycle length in epochs / updates (exactly one).
        t_mult: cosine_restarts: each cycle is ``t_mult`` times longer than the previous one, int ``>= 1``.
        end_factor: linear: LR at the end of the run as a fraction of the base LR, ``>= 0``.
        mode, factor, patience, threshold, threshold_mode, cooldown, min_lr: plateau, as torch's
            ReduceLROnPlateau (``mode="min"`` for a loss, "max" for an accuracy).

    An argument that does not apply to ``kind`` must keep its default. Problems raise one ValueError that
    lists all of them.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        kind: str = "cosine",
        *,
        steps_per_epoch: int,
        epochs: int,
        interval: str = "update",
        warmup_epochs: float = 0.0,
        warmup_steps: int | None = None,
        warmup_start_factor: float = 0.1,
        step_size: float | None = None,
        step_size_steps: int | None = None,
        milestones: Iterable[float] | None = None,
        milestones_steps: Iterable[int] | None = None,
        gamma: float = 0.1,
        eta_min: float = 0.0,
        t_0: float | None = None,
        t_0_steps: int | None = None,
        t_mult: int = 1,
        end_factor: float = 0.0,
        mode: str = "min",
        factor: float = 0.1,
        patience: int = 10,
        threshold: float = 1e-4,
        threshold_mode: str = "rel",
        cooldown: int = 0,
        min_lr: float = 0.0,
    ):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(kind, str):
            raise TypeError(
                f"kind must be a schedule name such as 'cosine', got {type(kind).__name__}; to build from a "
                "ScheduleConfig use trickbag.config.build_scheduler"
            )
        arguments = locals()  # every argument below the optimizer and run length is a ScheduleSpec field
        self.spec = ScheduleSpec(**{name: arguments[name] for name in SCHEDULE_DEFAULTS})
        self.optimizer = optimizer
        self.schedule = resolve_schedule(self.spec, steps_per_epoch=steps_per_epoch, epochs=epochs)
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.base_lrs = [float(group["initial_lr"]) for group in optimizer.param_groups]
        self.plateau = plateau_start(self.spec, self.base_lrs) if kind == "plateau" else None
        self.last_step = 0  # optimizer updates done so far
        self._apply()

    @property
    def epoch(self) -> int:
        return self.last_step // self.schedule.steps_per_epoch

    def lr_at(self, step: int, group: int = 0) -> float:
        """LR of param group ``group`` at update ``step`` (pure; for plateau, with the current reductions)."""
        plateau_lr = self.plateau.lrs[group] if self.plateau is not None else None
        return schedule_lr(self.schedule, step, self.base_lrs[group], plateau_lr)

    def step(self) -> None:
        """Call once per optimizer update that really happened."""
        self.last_step += 1
        self._apply()

    def observe(self, metric: float) -> None:
        """Call after each evaluation; only kind="plateau" uses the value."""
        if self.plateau is not None:
            self.plateau = plateau_observe(self.plateau, metric, self.spec)
            self._apply()

    def get_last_lr(self) -> list[float]:
        return list(self._last_lrs)

    def _apply(self) -> None:
        groups = self.optimizer.param_groups
        if len(groups) != len(self.base_lrs):
            raise ValueError(
                f"the optimizer has {len(groups)} param groups but the scheduler was built for "
                f"{len(self.base_lrs)}; build the Scheduler after adding param groups"
            )
        self._last_lrs = [self.lr_at(self.last_step, index) for index in range(len(groups))]
        for group, lr in zip(groups, self._last_lrs):
            group["lr"] = lr

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values only, loadable with ``torch.load(weights_only=True)``."""
        plateau = dataclasses.asdict(self.plateau) if self.plateau is not None else None
        if plateau is not None:
            plateau["lrs"] = list(plateau["lrs"])
        return {
            "kind": self.spec.kind,
            "last_step": self.last_step,
            "base_lrs": list(self.base_lrs),
            "plateau": plateau,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.spec.kind:
            raise ValueError(
                f"scheduler state is for kind={state.get('kind')!r}, this scheduler is {self.spec.kind!r}"
            )
        if len(state["base_lrs"]) != len(self.base_lrs):
            raise ValueError(
                f"scheduler state has {len(state['base_lrs'])} param groups, the optimizer has {len(self.base_lrs)}"
            )
        self.last_step = int(state["last_step"])
        self.base_lrs = [float(lr) for lr in state["base_lrs"]]
        if state["plateau"] is not None:
            self.plateau = PlateauState(**{**state["plateau"], "lrs": tuple(state["plateau"]["lrs"])})
        self._apply()


# ---------------------------------------------------------------------------------------------------------------
# Curves and plots


def lr_curve(
    kind: str = "cosine",
    *,
    base_lr: float,
    steps_per_epoch: int,
    epochs: int,
    metrics: list[float] | None = None,
    **schedule: Any,
) -> list[float]:
    """The LR of every optimizer update of a run (``epochs * steps_per_epoch`` values), for plotting.

    Args:
        kind, **schedule: the schedule, as the arguments of :class:`Scheduler` (an unknown name is a
            TypeError from Scheduler).
        base_lr: the optimizer's LR, ``> 0``.
        metrics: plateau only: one evaluation per epoch, observed at the end of that epoch.
    """
    if not base_lr > 0:
        raise ValueError(f"base_lr must be > 0, got {base_lr}")
    if metrics is not None and kind != "plateau":
        raise ValueError(f"metrics only apply to kind='plateau', got kind={kind!r}")
    if metrics is not None and len(metrics) > epochs:
        raise ValueError(f"metrics has {len(metrics)} values but there are only epochs={epochs}")
    # A one-parameter optimizer, so the curve goes through exactly the code a training run uses.
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
    scheduler = Scheduler(optimizer, kind, steps_per_epoch=steps_per_epoch, epochs=epochs, **schedule)
    lrs = []
    for epoch in range(epochs):
        for _ in range(steps_per_epoch):
            lrs.append(scheduler.get_last_lr()[0])
            scheduler.step()
        if metrics is not None and epoch < len(metrics):
            scheduler.observe(metrics[epoch])
    return lrs


def plot_lr_curve(
    lrs: list[float], path: str | Path, *, steps_per_epoch: int | None = None, title: str = "Learning rate"
) -> Path:
    """Save the LR curve as a PNG (x axis in epochs when ``steps_per_epoch`` is given, else in updates)."""
    if not lrs:
        raise ValueError("lrs is empty; nothing to plot")
    if steps_per_epoch is not None and steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1 or None, got {steps_per_epoch}")
    # The object-oriented API with the Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 3.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    x = [step / steps_per_epoch for step in range(len(lrs))] if steps_per_epoch else list(range(len(lrs)))
    axes.plot(x, lrs)
    axes.set_xlabel("epoch" if steps_per_epoch else "optimizer update")
    axes.set_ylabel("learning rate")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    return path
