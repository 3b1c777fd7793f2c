import inspect
import io
import math
import random
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.optim import lr_scheduler

from trickbag.config import ConfigError, ScheduleConfig, build_scheduler, config_from_dict, load_config
from trickbag.schedules import (
    SCHEDULE_DEFAULTS,
    Scheduler,
    ScheduleSpec,
    lr_curve,
    plot_lr_curve,
    resolve_schedule,
)


def make_optimizer(lrs=(0.1,)):
    groups = [{"params": [torch.zeros(1, requires_grad=True)], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups, lr=lrs[0])


def torch_lrs_per_epoch(make_torch_scheduler, epochs, lrs=(0.1, 0.03), metrics=None):
    """LRs of every group at the start of each epoch under a real torch scheduler stepped once per epoch."""
    optimizer = make_optimizer(lrs)
    scheduler = make_torch_scheduler(optimizer)
    out = []
    for epoch in range(epochs):
        out.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        if metrics is None:
            scheduler.step()
        else:
            scheduler.step(metrics[epoch])
    return out


def our_lrs_per_epoch(cfg, epochs, steps_per_epoch=3, lrs=(0.1, 0.03), metrics=None):
    """Same, but with our Scheduler stepped per update; also checks the LR is constant within each epoch."""
    optimizer = make_optimizer(lrs)
    scheduler = Scheduler(optimizer, **cfg, steps_per_epoch=steps_per_epoch, epochs=epochs)
    out = []
    for epoch in range(epochs):
        first = [group["lr"] for group in optimizer.param_groups]
        for _ in range(steps_per_epoch):
            assert [group["lr"] for group in optimizer.param_groups] == first
            scheduler.step()
        out.append(first)
        if metrics is not None:
            scheduler.observe(metrics[epoch])
    return out


# --- equality with torch's schedulers (interval="epoch", no warmup) ----------------------------------------------


@pytest.mark.parametrize("step_size,gamma", [(1, 0.5), (3, 0.1), (7, 0.9)])
def test_step_equals_torch_step_lr(step_size, gamma):
    cfg = dict(kind="step", interval="epoch", step_size=step_size, gamma=gamma)
    expected = torch_lrs_per_epoch(lambda o: lr_scheduler.StepLR(o, step_size, gamma), 40)
    assert our_lrs_per_epoch(cfg, 40) == expected  # exact, not approximate


@pytest.mark.parametrize("milestones", [[5, 10, 30], [3, 3, 8], [1], [12, 4]])
def test_multistep_equals_torch_multistep_lr(milestones):
    cfg = dict(kind="multistep", interval="epoch", milestones=milestones, gamma=0.3)
    expected = torch_lrs_per_epoch(lambda o: lr_scheduler.MultiStepLR(o, milestones, 0.3), 35)
    assert our_lrs_per_epoch(cfg, 35) == expected


@pytest.mark.parametrize("eta_min", [0.0, 0.001])
def test_cosine_equals_torch_cosine_annealing(eta_min):
    epochs = 50
    cfg = dict(kind="cosine", interval="epoch", eta_min=eta_min)
    expected = torch_lrs_per_epoch(lambda o: lr_scheduler.CosineAnnealingLR(o, epochs, eta_min), epochs)
    ours = our_lrs_per_epoch(cfg, epochs)
    # torch uses a recursive formula, we the closed form: they agree to rounding.
    for row_ours, row_torch in zip(ours, expected):
        assert row_ours == pytest.approx(row_torch, abs=1e-12, rel=0)


@pytest.mark.parametrize("t_0,t_mult,eta_min", [(5, 1, 0.0), (3, 2, 0.001), (2, 3, 0.0), (1, 1, 0.01)])
def test_cosine_restarts_equals_torch(t_0, t_mult, eta_min):
    cfg = dict(kind="cosine_restarts", interval="epoch", t_0=t_0, t_mult=t_mult, eta_min=eta_min)
    expected = torch_lrs_per_epoch(
        lambda o: lr_scheduler.CosineAnnealingWarmRestarts(o, t_0, t_mult, eta_min), 60
    )
    ours = our_lrs_per_epoch(cfg, 60)
    for row_ours, row_torch in zip(ours, expected):
        assert row_ours == pytest.approx(row_torch, abs=1e-15, rel=0)


def test_linear_equals_torch_linear_lr():
    cfg = dict(kind="linear", interval="epoch", end_factor=0.25)
    expected = torch_lrs_per_epoch(lambda o: lr_scheduler.LinearLR(o, 1.0, 0.25, total_iters=20), 25)
    ours = our_lrs_per_epoch(cfg, 20)
    for row_ours, row_torch in zip(ours, expected[:20]):
        assert row_ours == pytest.approx(row_torch, abs=1e-12, rel=0)


def noisy_metrics(seed, n, mode):
    rng = random.Random(seed)
    trend = (lambda i: 1.0 / (1 + 0.2 * i)) if mode == "min" else (lambda i: 1 - 1.0 / (1 + 0.2 * i))
    return [trend(i) + rng.gauss(0, 0.05) for i in range(n)]


@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize("threshold_mode,threshold", [("rel", 1e-4), ("rel", 0.05), ("abs", 0.02)])
@pytest.mark.parametrize("patience,cooldown,min_lr", [(0, 0, 0.0), (2, 1, 0.0), (3, 2, 0.004), (1, 0, 0.02)])
def test_plateau_equals_torch_reduce_on_plateau(mode, threshold_mode, threshold, patience, cooldown, min_lr):
    epochs = 60
    metrics = noisy_metrics(len(mode) + 7 * patience + 100 * cooldown + int(1000 * threshold), epochs, mode)
    options = dict(
        mode=mode,
        factor=0.5,
        patience=patience,
        threshold=threshold,
        threshold_mode=threshold_mode,
        cooldown=cooldown,
        min_lr=min_lr,
    )
    cfg = dict(kind="plateau", interval="epoch", **options)
    expected = torch_lrs_per_epoch(
        lambda o: lr_scheduler.ReduceLROnPlateau(o, **options), epochs, metrics=metrics
    )
    ours = our_lrs_per_epoch(cfg, epochs, metrics=metrics)
    assert ours == expected
    assert ours[-1] != ours[0]  # the sequence really reduced the LR, so the comparison tested something


def test_plateau_constant_metric_and_nan_count_as_bad():
    metrics = [1.0, 1.0, float("nan"), 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5]
    cfg = dict(kind="plateau", interval="epoch", patience=1)
    expected = torch_lrs_per_epoch(
        lambda o: lr_scheduler.ReduceLROnPlateau(o, patience=1), 10, metrics=metrics
    )
    assert our_lrs_per_epoch(cfg, 10, metrics=metrics) == expected


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(["step", "multistep", "cosine_restarts"]),
    size=st.integers(1, 9),
    extra=st.lists(st.integers(1, 30), min_size=1, max_size=4),
    gamma=st.floats(0.05, 0.95),
    t_mult=st.integers(1, 3),
    base=st.floats(1e-4, 10.0),
)
def test_random_configs_equal_torch(kind, size, extra, gamma, t_mult, base):
    if kind == "step":
        cfg = dict(kind=kind, interval="epoch", step_size=size, gamma=gamma)
        make = lambda o: lr_scheduler.StepLR(o, size, gamma)  # noqa: E731
    elif kind == "multistep":
        cfg = dict(kind=kind, interval="epoch", milestones=extra, gamma=gamma)
        make = lambda o: lr_scheduler.MultiStepLR(o, extra, gamma)  # noqa: E731
    else:
        cfg = dict(kind=kind, interval="epoch", t_0=size, t_mult=t_mult, eta_min=base / 100)
        make = lambda o: lr_scheduler.CosineAnnealingWarmRestarts(o, size, t_mult, base / 100)  # noqa: E731
    expected = torch_lrs_per_epoch(make, 40, lrs=(base,))
    ours = our_lrs_per_epoch(cfg, 40, steps_per_epoch=2, lrs=(base,))
    if kind == "cosine_restarts":
        assert [row[0] for row in ours] == pytest.approx([row[0] for row in expected], rel=1e-14, abs=0)
    else:
        assert ours == expected


@settings(max_examples=40, deadline=None)
@given(
    warmup=st.integers(1, 30),
    start=st.floats(0.0, 1.0),
    steps_per_epoch=st.integers(1, 7),
    epochs=st.integers(1, 8),
    end_factor=st.floats(0.0, 1.0),
)
def test_random_warmup_linear_closed_form(warmup, start, steps_per_epoch, epochs, end_factor):
    cfg = dict(kind="linear", warmup_steps=warmup, warmup_start_factor=start, end_factor=end_factor)
    lrs = lr_curve(**cfg, base_lr=2.0, steps_per_epoch=steps_per_epoch, epochs=epochs)
    total = steps_per_epoch * epochs
    for step, lr in enumerate(lrs):
        expected = 2.0 * (1 + (end_factor - 1) * step / total)
        if step < warmup:
            expected *= start + (1 - start) * step / warmup
        assert lr == pytest.approx(expected, rel=1e-12, abs=1e-15)


# --- interval="update" and warmup: closed-form references ---------------------------------------------------------


def test_cosine_per_update_closed_form():
    cfg = dict(kind="cosine", eta_min=0.01)
    lrs = lr_curve(**cfg, base_lr=0.4, steps_per_epoch=7, epochs=3)
    total = 21
    assert len(lrs) == total
    for step, lr in enumerate(lrs):
        assert lr == pytest.approx(
            0.01 + (0.4 - 0.01) * (1 + math.cos(math.pi * step / total)) / 2, abs=1e-15
        )


def test_warmup_per_update_closed_form():
    cfg = dict(kind="cosine", warmup_steps=5, warmup_start_factor=0.2)
    lrs = lr_curve(**cfg, base_lr=1.0, steps_per_epoch=10, epochs=2)
    for step, lr in enumerate(lrs):
        cosine = (1 + math.cos(math.pi * step / 20)) / 2
        warm = 0.2 + 0.8 * step / 5 if step < 5 else 1.0
        assert lr == pytest.approx(cosine * warm, abs=1e-15)
    assert lrs[0] == pytest.approx(0.2)


def test_warmup_epochs_converted_to_updates_and_epoch_interval():
    per_update = lr_curve("constant", warmup_epochs=0.5, base_lr=1.0, steps_per_epoch=8, epochs=2)
    assert per_update[:4] == pytest.approx([0.1, 0.1 + 0.9 / 4, 0.1 + 0.9 * 2 / 4, 0.1 + 0.9 * 3 / 4])
    assert per_update[4:] == [1.0] * 12
    per_epoch = lr_curve(
        "constant",
        interval="epoch",
        warmup_epochs=2,
        warmup_start_factor=0.0,
        base_lr=1.0,
        steps_per_epoch=3,
        epochs=4,
    )
    assert per_epoch == [0.0] * 3 + [0.5] * 3 + [1.0] * 6


def test_step_and_multistep_in_updates():
    lrs = lr_curve("step", step_size=1, gamma=0.5, base_lr=1.0, steps_per_epoch=2, epochs=3)
    assert lrs == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]  # epochs converted to updates: decay every 2 updates
    lrs = lr_curve(
        "multistep",
        milestones_steps=[1, 4],
        gamma=0.5,
        base_lr=1.0,
        steps_per_epoch=3,
        epochs=2,
    )
    assert lrs == [1.0, 0.5, 0.5, 0.5, 0.25, 0.25]  # the LR changes within an epoch


def test_cosine_restarts_per_update_matches_torch_stepped_per_update():
    cfg = dict(kind="cosine_restarts", t_0_steps=4, t_mult=2, eta_min=0.0)
    expected = [
        row[0]
        for row in torch_lrs_per_epoch(
            lambda o: lr_scheduler.CosineAnnealingWarmRestarts(o, 4, 2), 30, lrs=(0.1,)
        )
    ]
    assert lr_curve(**cfg, base_lr=0.1, steps_per_epoch=5, epochs=6) == pytest.approx(expected, abs=1e-15)


def test_plateau_per_update_with_warmup_reduces_after_observe():
    cfg = dict(kind="plateau", patience=0, factor=0.5, warmup_steps=2)
    lrs = lr_curve(**cfg, base_lr=1.0, steps_per_epoch=2, epochs=4, metrics=[1.0, 2.0, 3.0])
    assert lrs == pytest.approx([0.1, 0.55, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25])


def test_per_group_base_lrs_respected():
    optimizer = make_optimizer((1.0, 0.1))
    scheduler = Scheduler(optimizer, "linear", end_factor=0.0, steps_per_epoch=2, epochs=2)
    scheduler.step()
    assert scheduler.get_last_lr() == pytest.approx([0.75, 0.075])
    assert [g["lr"] for g in optimizer.param_groups] == scheduler.get_last_lr()
    assert scheduler.lr_at(2, group=1) == pytest.approx(0.05)
    assert scheduler.epoch == 0


def test_lr_at_is_pure():
    scheduler = Scheduler(make_optimizer(), "cosine", steps_per_epoch=5, epochs=2)
    before = scheduler.lr_at(7)
    scheduler.step()
    assert scheduler.lr_at(7) == before
    assert scheduler.last_step == 1


# --- resume --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        dict(kind="cosine", warmup_steps=3),
        dict(kind="plateau", patience=1, cooldown=1, factor=0.5),
        dict(kind="multistep", milestones=[1, 2], interval="epoch"),
    ],
)
def test_state_dict_round_trip_continues_same_curve(cfg):
    metrics = [1.0, 0.9, 0.95, 0.99, 1.2, 1.3, 0.1, 0.2]

    def run(scheduler, epochs):
        lrs = []
        for epoch in epochs:
            for _ in range(3):
                lrs.append(scheduler.get_last_lr())
                scheduler.step()
            scheduler.observe(metrics[epoch])
        return lrs

    straight = Scheduler(make_optimizer((0.1, 0.2)), **cfg, steps_per_epoch=3, epochs=8)
    expected = run(straight, range(8))

    first = Scheduler(make_optimizer((0.1, 0.2)), **cfg, steps_per_epoch=3, epochs=8)
    head = run(first, range(4))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    optimizer = make_optimizer((0.1, 0.2))
    resumed = Scheduler(optimizer, **cfg, steps_per_epoch=3, epochs=8)
    resumed.load_state_dict(state)
    assert [g["lr"] for g in optimizer.param_groups] == first.get_last_lr()
    assert head + run(resumed, range(4, 8)) == expected


def test_load_state_dict_rejects_other_kind_and_group_count():
    state = Scheduler(make_optimizer(), "cosine", steps_per_epoch=1, epochs=2).state_dict()
    other = Scheduler(make_optimizer(), "constant", steps_per_epoch=1, epochs=2)
    with pytest.raises(ValueError, match="kind='cosine'"):
        other.load_state_dict(state)
    two_groups = Scheduler(make_optimizer((0.1, 0.2)), "cosine", steps_per_epoch=1, epochs=2)
    with pytest.raises(ValueError, match="1 param groups"):
        two_groups.load_state_dict(state)


def test_param_group_added_after_construction_is_an_error():
    optimizer = make_optimizer()
    scheduler = Scheduler(optimizer, "constant", steps_per_epoch=1, epochs=1)
    optimizer.add_param_group({"params": [torch.zeros(1, requires_grad=True)]})
    with pytest.raises(ValueError, match="2 param groups"):
        scheduler.step()


# --- validation: the plain Scheduler and the YAML section apply the same rules --------------------------------------

# Rules between arguments: the same message from Scheduler(...) and from ScheduleConfig(...).
RULES = [
    ({"kind": "cosine", "milestones": [3]}, r"milestones does not apply to kind='cosine'"),
    ({"kind": "step", "patience": 3, "step_size": 1}, r"patience does not apply to kind='step'"),
    ({"kind": "constant", "warmup_epochs": 1, "warmup_steps": 5}, "not both"),
    ({"kind": "step"}, "exactly one of step_size or step_size_steps"),
    ({"kind": "step", "step_size": 2, "step_size_steps": 4}, "exactly one of step_size"),
    ({"kind": "multistep"}, "exactly one of milestones"),
    ({"kind": "multistep", "milestones": []}, "non-empty"),
    ({"kind": "multistep", "milestones": [0, 3]}, "numbers > 0"),
    ({"kind": "cosine_restarts"}, "exactly one of t_0"),
    ({"kind": "constant", "interval": "epoch", "warmup_steps": 3}, "warmup_steps counts optimizer updates"),
]
# Ranges and choices: the messages differ (pydantic's in the config) but both name the field.
RANGES = [
    ({"kind": "cosin"}, "kind"),
    ({"interval": "batch"}, "interval"),
    ({"warmup_epochs": -1}, "warmup_epochs"),
    ({"warmup_steps": -1}, "warmup_steps"),
    ({"kind": "cosine", "warmup_start_factor": 1.5}, "warmup_start_factor"),
    ({"kind": "step", "step_size": 0}, "step_size"),
    ({"kind": "step", "step_size_steps": 0}, "step_size_steps"),
    ({"kind": "step", "step_size": 1, "gamma": 0}, "gamma"),
    ({"eta_min": -0.1}, "eta_min"),
    ({"kind": "cosine_restarts", "t_0": 0}, "t_0"),
    ({"kind": "cosine_restarts", "t_0_steps": 0}, "t_0_steps"),
    ({"kind": "cosine_restarts", "t_0": 1, "t_mult": 0}, "t_mult"),
    ({"kind": "linear", "end_factor": -1}, "end_factor"),
    ({"kind": "plateau", "mode": "up"}, "mode"),
    ({"kind": "plateau", "factor": 1.0}, "factor"),
    ({"kind": "plateau", "patience": -1}, "patience"),
    ({"kind": "plateau", "threshold": -1}, "threshold"),
    ({"kind": "plateau", "threshold_mode": "pct"}, "threshold_mode"),
    ({"kind": "plateau", "cooldown": -1}, "cooldown"),
    ({"kind": "plateau", "min_lr": -1}, "min_lr"),
]


@pytest.mark.parametrize("fields,message", RULES + RANGES)
def test_scheduler_argument_rules(fields, message):
    with pytest.raises(ValueError, match=message):
        Scheduler(make_optimizer(), **fields, steps_per_epoch=2, epochs=3)


@pytest.mark.parametrize("fields,message", RULES + RANGES + [({"kind": "cosine", "typo": 1}, "typo")])
def test_config_validation(fields, message):
    with pytest.raises(ValueError, match=message):
        ScheduleConfig(**fields)


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"kind": "plateau", "patience": 1.5}, r"patience must be an int >= 0, got 1.5"),
        ({"kind": "plateau", "patience": True}, r"patience must be an int >= 0, got True"),
        ({"kind": "cosine", "eta_min": float("nan")}, r"eta_min must be a number >= 0, got nan"),
        ({"kind": "step", "step_size": "2"}, r"step_size must be a number > 0 or None, got '2'"),
        (
            {"kind": "multistep", "milestones": 3},
            r"milestones must be a non-empty list of numbers > 0, got 3",
        ),
        (
            {"kind": "multistep", "milestones_steps": [2.5]},
            r"milestones_steps must be a non-empty list of ints",
        ),
        ({"kind": "step", "step_size": 1, "gamma": 0.5, "eta_min": 0.1}, r"eta_min does not apply"),
    ],
)
def test_scheduler_argument_types_and_messages(fields, message):
    with pytest.raises(ValueError, match=message):
        Scheduler(make_optimizer(), **fields, steps_per_epoch=2, epochs=3)


def test_unknown_argument_and_config_as_kind_are_type_errors():
    with pytest.raises(TypeError, match="typo"):
        Scheduler(make_optimizer(), "cosine", typo=1, steps_per_epoch=1, epochs=1)
    with pytest.raises(TypeError, match="use trickbag.config.build_scheduler"):
        Scheduler(make_optimizer(), ScheduleConfig(), steps_per_epoch=1, epochs=1)


def test_all_problems_reported_together():
    with pytest.raises(ValueError, match=r"eta_min does not apply.*gamma does not apply|gamma.*eta_min"):
        ScheduleConfig(kind="constant", eta_min=0.1, gamma=0.5)
    with pytest.raises(ValueError, match=r"gamma must be.*patience must be.*eta_min does not apply"):
        ScheduleSpec(kind="step", step_size=1, gamma=-1.0, patience=-1, eta_min=0.5)


def test_non_applicable_argument_at_its_default_is_accepted():
    # A field at its default counts as not given: what a dump writes out validates again.
    Scheduler(
        make_optimizer(), "cosine", gamma=0.1, patience=10, milestones=None, steps_per_epoch=1, epochs=1
    )
    ScheduleConfig(kind="cosine", gamma=0.1, patience=10, warmup_epochs=0.0, warmup_steps=3)
    with pytest.raises(ValueError, match="gamma does not apply"):
        ScheduleConfig(kind="cosine", gamma=0.2)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"kind": "constant", "interval": "epoch", "warmup_epochs": 2},
        {"kind": "linear", "end_factor": 0.2, "warmup_steps": 4},
        {"kind": "step", "step_size_steps": 3, "gamma": 0.5},
        {"kind": "multistep", "milestones": [2, 5.5], "interval": "epoch"},
        {"kind": "multistep", "milestones_steps": [10, 20]},
        {"kind": "cosine_restarts", "t_0": 2, "t_mult": 2, "eta_min": 1e-4},
        {
            "kind": "plateau",
            "mode": "max",
            "patience": 2,
            "threshold_mode": "abs",
            "cooldown": 1,
            "min_lr": 1e-3,
        },
    ],
)
def test_config_dump_round_trips(fields):
    cfg = ScheduleConfig(**fields)
    for mode in ("python", "json"):
        again = ScheduleConfig.model_validate(cfg.model_dump(mode=mode))
        assert again == cfg
    # The full dump also builds the same Scheduler as the plain arguments the config was written with.
    a = build_scheduler(make_optimizer(), cfg, steps_per_epoch=4, epochs=6)
    b = Scheduler(make_optimizer(), **fields, steps_per_epoch=4, epochs=6)
    assert a.schedule == b.schedule and a.spec == b.spec


def test_defaults_agree_between_scheduler_spec_and_config():
    parameters = inspect.signature(Scheduler).parameters
    from_signature = {name: parameters[name].default for name in SCHEDULE_DEFAULTS}
    assert from_signature == SCHEDULE_DEFAULTS
    assert set(parameters) - set(SCHEDULE_DEFAULTS) == {"optimizer", "steps_per_epoch", "epochs"}
    from_config = {name: field.default for name, field in ScheduleConfig.model_fields.items()}
    assert from_config == SCHEDULE_DEFAULTS


def test_build_scheduler_from_a_config():
    cfg = ScheduleConfig(kind="step", step_size=1, gamma=0.5, warmup_steps=1)
    optimizer = make_optimizer((1.0,))
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=2, epochs=3)
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step()
    assert lrs == [0.1, 1.0, 0.5, 0.5, 0.25, 0.25]
    with pytest.raises(TypeError, match="cfg must be a ScheduleConfig"):
        build_scheduler(make_optimizer(), {"kind": "cosine"}, steps_per_epoch=1, epochs=1)


def test_yaml_errors_name_the_key():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["schedule.kind=cosin", "schedule.t_mult=0", "schedule.gamma=2"])
    message = str(info.value)
    assert "schedule.kind='cosin' not in {" in message and "'cosine_restarts'" in message
    assert "schedule.t_mult=0" in message
    with pytest.raises(ConfigError, match="gamma does not apply to kind='cosine'"):
        load_config(None, ["schedule.gamma=0.5"])


@pytest.mark.parametrize("steps_per_epoch,epochs,message", [(0, 3, "steps_per_epoch"), (2, 0, "epochs")])
def test_scheduler_run_length_validation(steps_per_epoch, epochs, message):
    with pytest.raises(ValueError, match=message):
        Scheduler(make_optimizer(), steps_per_epoch=steps_per_epoch, epochs=epochs)


def test_scheduler_type_validation():
    with pytest.raises(TypeError, match="optimizer must be"):
        Scheduler(object(), steps_per_epoch=1, epochs=1)
    with pytest.raises(TypeError, match="spec must be a ScheduleSpec"):
        resolve_schedule({"kind": "cosine"}, steps_per_epoch=1, epochs=1)


@pytest.mark.parametrize("module", ["trickbag.schedules", "trickbag.optim"])
def test_library_module_imports_neither_pydantic_nor_config(module):
    code = (
        f"import sys, {module}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'pydantic' or m in "
    )
    code += "('trickbag.config', 'trickbag.train', 'trickbag.cli', 'trickbag.checkpoint', 'trickbag.run')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_lr_curve_validation():
    with pytest.raises(ValueError, match="metrics only apply"):
        lr_curve("cosine", base_lr=0.1, steps_per_epoch=1, epochs=2, metrics=[1.0])
    with pytest.raises(ValueError, match="only epochs=2"):
        lr_curve("plateau", base_lr=0.1, steps_per_epoch=1, epochs=2, metrics=[1.0] * 3)
    with pytest.raises(ValueError, match="base_lr"):
        lr_curve("cosine", base_lr=0.0, steps_per_epoch=1, epochs=2)
    with pytest.raises(TypeError, match="gama"):
        lr_curve("step", step_size=1, gama=0.5, base_lr=0.1, steps_per_epoch=1, epochs=2)


def test_plot_lr_curve_writes_png(tmp_path):
    lrs = lr_curve("cosine", warmup_epochs=1, base_lr=0.1, steps_per_epoch=4, epochs=5)
    path = plot_lr_curve(lrs, tmp_path / "lr.png", steps_per_epoch=4, title="cosine")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="lrs is empty"):
        plot_lr_curve([], tmp_path / "empty.png")
    with pytest.raises(ValueError, match="steps_per_epoch"):
        plot_lr_curve(lrs, tmp_path / "x.png", steps_per_epoch=0)


# --- trickbag schedule (CLI) ----------------------------------------------------------------------------------------

RUN_YAML = """
epochs: 4
batch_size: 64
accumulate: 2
model: {name: whatever, options: {depth: 3}}
optimizer: {name: sgd, lr: 0.4, ref_batch_size: 256}
schedule: {kind: step, step_size: 1, gamma: 0.5, interval: epoch}
"""


def run_cli(*argv):
    from trickbag.cli import main

    return main(list(argv))


def test_cli_show_prints_scaled_lr_at_epoch_boundaries(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(RUN_YAML)
    # 1030 images / 64 -> 16 full micro-batches (drop_last) -> 8 updates per epoch; lr 0.4 per 256 -> 0.2 at 128
    assert run_cli("schedule", "show", str(config), "--num-train", "1030") == 0
    out = capsys.readouterr().out
    assert "8 updates/epoch" in out and "base lr 0.2" in out
    rows = [line.split() for line in out.splitlines()[2:]]
    assert rows == [
        ["0", "0", "0.2"],
        ["1", "8", "0.1"],
        ["2", "16", "0.05"],
        ["3", "24", "0.025"],
        ["last", "31", "0.025"],
    ]


def test_cli_plot_writes_png_and_epochs_override(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(RUN_YAML)
    out_png = tmp_path / "lr.png"
    assert (
        run_cli(
            "schedule", "plot", str(config), "--steps-per-epoch", "3", "--epochs", "6", "--out", str(out_png)
        )
        == 0
    )
    assert out_png.read_bytes()[:4] == b"\x89PNG"
    assert "18 updates, 6 epochs" in capsys.readouterr().out


def test_cli_plateau_metrics(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(
        "epochs: 3\nschedule: {kind: plateau, patience: 0, interval: epoch}\noptimizer: {scale_lr: false}\n"
    )
    assert run_cli("schedule", "show", str(config), "--steps-per-epoch", "2", "--metrics", "1,2") == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [row[2] for row in rows] == ["0.1", "0.1", "0.01", "0.01"]


def test_cli_reports_every_error_with_file_and_key(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(
        "epochs: 0\nschedule: {kind: cosin}\noptimizer: {lr: -1, momentm: 0.9}\ndata: {anything: 1}\n"
    )
    assert run_cli("schedule", "show", str(config), "--steps-per-epoch", "2") == 2
    err = capsys.readouterr().err
    assert "bad.yaml: schedule.kind='cosin'" in err
    assert "bad.yaml: optimizer.lr=-1" in err
    assert "bad.yaml: optimizer.momentm=0.9: Extra inputs are not permitted" in err
    assert "bad.yaml: epochs=0: must be an int >= 1" in err
    assert "data" not in err  # other sections are not this command's business


@pytest.mark.parametrize(
    "yaml_text,extra,message",
    [
        (
            "schedule: {kind: cosine, milestones: [2]}\n",
            ["--steps-per-epoch", "2"],
            "schedule: milestones does not apply",
        ),
        ("epochs: 2\n", [], "give --steps-per-epoch N or --num-train N"),
        ("epochs: 2\n", ["--steps-per-epoch", "0"], "--steps-per-epoch must be >= 1"),
        ("epochs: 2\n", ["--num-train", "0"], "--num-train must be >= 1"),
        ("epochs: 2\n", ["--steps-per-epoch", "2", "--metrics", "a,b"], "--metrics must be comma-separated"),
        ("epochs: 2\n", ["--steps-per-epoch", "2", "--metrics", "1"], "metrics only apply to kind='plateau'"),
        ("epochs: 2\n", ["--steps-per-epoch", "2", "--rows", "1"], "--rows must be >= 2"),
        ("- a\n- b\n", ["--steps-per-epoch", "2"], "top level must be a mapping"),
        ("schedule: [1]\n", ["--steps-per-epoch", "2"], "schedule must be a mapping"),
        ("a: [\n", ["--steps-per-epoch", "2"], "invalid YAML"),
    ],
)
def test_cli_user_errors(tmp_path, capsys, yaml_text, extra, message):
    config = tmp_path / "run.yaml"
    config.write_text(yaml_text)
    assert run_cli("schedule", "show", str(config), *extra) == 2
    assert message in capsys.readouterr().err


def test_cli_missing_file(tmp_path, capsys):
    assert run_cli("schedule", "plot", str(tmp_path / "nope.yaml"), "--steps-per-epoch", "2") == 2
    assert "config file not found" in capsys.readouterr().err


def test_whole_config_dump_with_every_schedule_field_loads_again():
    # What lets config_to_dict write the schedule section in full: each field's default counts as not given.
    cfg = load_config(None, ["schedule.kind=multistep", "schedule.milestones=[2, 4]", "schedule.gamma=0.5"])
    data = cfg.model_dump(mode="json")
    assert (
        data["schedule"]["patience"] == 10 and data["schedule"]["eta_min"] == 0.0
    )  # non-applicable, written out
    assert config_from_dict(data).schedule == cfg.schedule
