"""Learning-rate schedules: constant, linear, step, multistep, cosine, SGDR restarts and reduce-on-plateau,
each with an optional linear warmup.

Schedules are pure: :func:`schedule_lr` maps an optimizer-update count to a learning rate, and
:class:`Scheduler` is the one place that writes ``param_group["lr"]``. Calling contract of the Scheduler:

* ``step()`` once per optimizer update that really happened (not per micro-batch, and not when the fp16
  GradScaler skipped the update);
* ``observe(metric)`` after each evaluation (only ``kind="plateau"`` uses it; the metric's direction must
  match ``mode``: "min" for a loss, "max" for an accuracy);
* the epoch is derived as ``updates // steps_per_epoch``, so ``steps_per_epoch`` must be the number of optimizer
  updates per epoch (updates skipped by the fp16 scaler, usually a few at the start, delay the epoch
  boundaries of ``interval="epoch"`` by as many updates).

Durations are given in epochs (``step_size``, ``milestones``, ``t_0``, ``warmup_epochs``) or in optimizer updates
(the ``*_steps`` fields). With ``interval="update"`` the LR changes after every update; with
``interval="epoch"`` only at epoch boundaries, and without warmup the LRs then equal those of
``torch.optim.lr_scheduler.StepLR / MultiStepLR / CosineAnnealingLR / CosineAnnealingWarmRestarts /
ReduceLROnPlateau`` stepped once per epoch.

Warmup multiplies the schedule by ``start + (1 - start) * t / warmup`` for ``t < warmup`` (``t`` in updates, or
in epochs with ``interval="epoch"``); the main schedule keeps its absolute clock, so milestones stay where they
are written and cosine still ends at the end of the run.

References: Loshchilov & Hutter 2016, SGDR, https://arxiv.org/abs/1608.03983; Goyal et al. 2017 (warmup),
https://arxiv.org/abs/1706.02677
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

ScheduleKind = Literal["constant", "linear", "step", "multistep", "cosine", "cosine_restarts", "plateau"]

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
# Config


class ScheduleConfig(BaseModel):
    """The ``schedule:`` section. Durations are in epochs, or in optimizer updates for ``*_steps`` fields."""

    model_config = ConfigDict(extra="forbid")

    kind: ScheduleKind = "cosine"
    interval: Literal["update", "epoch"] = "update"
    warmup_epochs: float = Field(0.0, ge=0.0)
    warmup_steps: int | None = Field(None, ge=0)
    warmup_start_factor: float = Field(0.1, ge=0.0, le=1.0)  # warmup starts at this fraction of the LR
    step_size: float | None = Field(None, gt=0.0)  # step: decay every step_size epochs
    step_size_steps: int | None = Field(None, gt=0)
    milestones: list[float] | None = None  # multistep: epochs at which the LR is multiplied by gamma
    milestones_steps: list[int] | None = None
    gamma: float = Field(0.1, gt=0.0)
    eta_min: float = Field(0.0, ge=0.0)  # cosine / cosine_restarts: final LR (absolute)
    t_0: float | None = Field(None, gt=0.0)  # cosine_restarts: length of the first cycle in epochs
    t_0_steps: int | None = Field(None, gt=0)
    t_mult: int = Field(1, ge=1)  # each cycle is t_mult times longer than the previous one
    end_factor: float = Field(0.0, ge=0.0)  # linear: LR at the end of the run, as a fraction of the base LR
    mode: Literal["min", "max"] = "min"  # plateau: whether the observed metric should go down or up
    factor: float = Field(0.1, gt=0.0, lt=1.0)
    patience: int = Field(10, ge=0)
    threshold: float = Field(1e-4, ge=0.0)
    threshold_mode: Literal["rel", "abs"] = "rel"
    cooldown: int = Field(0, ge=0)
    min_lr: float = Field(0.0, ge=0.0)

    @model_validator(mode="after")
    def _check_fields_of_kind(self) -> ScheduleConfig:
        problems = []
        allowed = _COMMON_FIELDS | _KIND_FIELDS[self.kind]
        for name in sorted(self.model_fields_set - allowed):
            users = [kind for kind, fields in _KIND_FIELDS.items() if name in fields]
            problems.append(
                f"{name} does not apply to kind={self.kind!r} (it is used by kind {' / '.join(users)})"
            )
        if "warmup_epochs" in self.model_fields_set and self.warmup_steps is not None:
            problems.append("give warmup_epochs or warmup_steps, not both")
        if self.interval == "epoch":
            for name in _UPDATE_FIELDS:
                if getattr(self, name) is not None:
                    problems.append(
                        f"{name} counts optimizer updates but interval='epoch'; "
                        f"use {name.removesuffix('_steps')} (epochs) or interval='update'"
                    )
        if self.kind in _DURATION_PAIRS:
            in_epochs, in_steps = _DURATION_PAIRS[self.kind]
            given = [name for name in (in_epochs, in_steps) if getattr(self, name) is not None]
            if len(given) != 1:
                problems.append(
                    f"kind={self.kind!r} needs exactly one of {in_epochs} or {in_steps}, got {given}"
                )
        for name in ("milestones", "milestones_steps"):
            values = getattr(self, name)
            if values is not None and (not values or min(values) <= 0):
                problems.append(f"{name} must be a non-empty list of numbers > 0, got {values}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


# ---------------------------------------------------------------------------------------------------------------
# Pure schedule math


@dataclasses.dataclass(frozen=True)
class ResolvedSchedule:
    """A ScheduleConfig with every duration converted to its clock: updates, or epochs if ``per_epoch``."""

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


def resolve_schedule(cfg: ScheduleConfig, *, steps_per_epoch: int, epochs: int) -> ResolvedSchedule:
    """Convert the durations of ``cfg`` to the clock of its interval (updates or epochs)."""
    if not isinstance(cfg, ScheduleConfig):
        raise TypeError(f"cfg must be a ScheduleConfig, got {type(cfg).__name__}")
    for name, value in (("steps_per_epoch", steps_per_epoch), ("epochs", epochs)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    per_epoch = cfg.interval == "epoch"
    scale = 1 if per_epoch else steps_per_epoch

    def duration(in_epochs: float | None, in_steps: int | None, minimum: int = 1) -> float:
        if in_steps is not None:
            return in_steps
        if in_epochs is None:
            return minimum
        # Per-update clocks count whole updates; per-epoch clocks may keep fractional epochs.
        return in_epochs if per_epoch else max(minimum, round(in_epochs * scale))

    if cfg.milestones_steps is not None:
        milestones = tuple(sorted(cfg.milestones_steps))
    else:
        milestones = tuple(sorted(duration(m, None) for m in cfg.milestones or ()))
    return ResolvedSchedule(
        kind=cfg.kind,
        steps_per_epoch=steps_per_epoch,
        per_epoch=per_epoch,
        total=epochs * scale,
        warmup=duration(cfg.warmup_epochs, cfg.warmup_steps, minimum=0),
        warmup_start_factor=cfg.warmup_start_factor,
        step_size=duration(cfg.step_size, cfg.step_size_steps),
        milestones=milestones,
        gamma=cfg.gamma,
        eta_min=cfg.eta_min,
        t_0=duration(cfg.t_0, cfg.t_0_steps),
        t_mult=cfg.t_mult,
        end_factor=cfg.end_factor,
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


def plateau_start(cfg: ScheduleConfig, base_lrs: list[float]) -> PlateauState:
    return PlateauState(
        lrs=tuple(float(lr) for lr in base_lrs), best=math.inf if cfg.mode == "min" else -math.inf
    )


def plateau_is_better(metric: float, best: float, cfg: ScheduleConfig) -> bool:
    if cfg.mode == "min":
        return metric < (
            best * (1.0 - cfg.threshold) if cfg.threshold_mode == "rel" else best - cfg.threshold
        )
    return metric > (best * (1.0 + cfg.threshold) if cfg.threshold_mode == "rel" else best + cfg.threshold)


def plateau_observe(state: PlateauState, metric: float, cfg: ScheduleConfig) -> PlateauState:
    """The state after one evaluation with value ``metric`` (same rules as ReduceLROnPlateau.step).

    A NaN metric counts as "not better", as in torch.
    """
    metric = float(metric)
    best, num_bad, cooldown, lrs = state.best, state.num_bad_epochs + 1, state.cooldown_counter, state.lrs
    if plateau_is_better(metric, best, cfg):
        best, num_bad = metric, 0
    if cooldown > 0:
        cooldown, num_bad = cooldown - 1, 0  # bad epochs during cooldown do not count
    if num_bad > cfg.patience:
        reduced = [max(lr * cfg.factor, cfg.min_lr) for lr in lrs]
        lrs = tuple(new if old - new > _PLATEAU_EPS else old for old, new in zip(lrs, reduced))
        cooldown, num_bad = cfg.cooldown, 0
    return PlateauState(lrs, best, num_bad, cooldown, state.num_observations + 1)


# ---------------------------------------------------------------------------------------------------------------
# Scheduler: the one place that writes param_group["lr"]


class Scheduler:
    """Drives an optimizer's learning rates with a :class:`ScheduleConfig` (calling contract: module docstring).

    Each param group keeps its own base LR (its ``initial_lr``, else its ``lr`` at construction).
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, *, steps_per_epoch: int, epochs: int
    ):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.config = cfg
        self.schedule = resolve_schedule(cfg, steps_per_epoch=steps_per_epoch, epochs=epochs)
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.base_lrs = [float(group["initial_lr"]) for group in optimizer.param_groups]
        self.plateau = plateau_start(cfg, self.base_lrs) if cfg.kind == "plateau" else None
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
            self.plateau = plateau_observe(self.plateau, metric, self.config)
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
            "kind": self.config.kind,
            "last_step": self.last_step,
            "base_lrs": list(self.base_lrs),
            "plateau": plateau,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.config.kind:
            raise ValueError(
                f"scheduler state is for kind={state.get('kind')!r}, this scheduler is {self.config.kind!r}"
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


def scheduler_from_config(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, *, steps_per_epoch: int, epochs: int
) -> Scheduler:
    return Scheduler(optimizer, cfg, steps_per_epoch=steps_per_epoch, epochs=epochs)


# ---------------------------------------------------------------------------------------------------------------
# Curves and plots


def lr_curve(
    cfg: ScheduleConfig,
    *,
    base_lr: float,
    steps_per_epoch: int,
    epochs: int,
    metrics: list[float] | None = None,
) -> list[float]:
    """The LR of every optimizer update of a run (``epochs * steps_per_epoch`` values), for plotting.

    ``metrics`` (plateau only): one evaluation per epoch, observed at the end of that epoch.
    """
    if not base_lr > 0:
        raise ValueError(f"base_lr must be > 0, got {base_lr}")
    if metrics is not None and cfg.kind != "plateau":
        raise ValueError(f"metrics only apply to kind='plateau', got kind={cfg.kind!r}")
    if metrics is not None and len(metrics) > epochs:
        raise ValueError(f"metrics has {len(metrics)} values but there are only epochs={epochs}")
    # A one-parameter optimizer, so the curve goes through exactly the code a training run uses.
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
    scheduler = Scheduler(optimizer, cfg, steps_per_epoch=steps_per_epoch, epochs=epochs)
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
