"""trickbag.compile: the break-even rule, compiled == eager within tolerance, the fallback on a compiler failure,
and checkpoints of a compiled model (no ``_orig_mod.``) that load uncompiled and resume compiled, with EMA."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import trickbag.compile as compile_module
from trickbag.checkpoint import load_checkpoint
from trickbag.compile import compile_model, decide, strip_compile_prefix, unwrap
from trickbag.config import load_config
from trickbag.run import build_run, finish_run, fit_options, load_model
from trickbag.train import fit, restore_training_state

REPO = Path(__file__).resolve().parent.parent
DIGITS = REPO / "recipes" / "digits.yaml"
BACKEND = "aot_eager"  # dynamo + AOT autograd without a C++ compiler: seconds, not the minute inductor takes


class Tiny(nn.Module):
    """Defined here, not an nn.Sequential: dynamo does not trace a module whose code is all inside torch.nn."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).relu().flatten(1))


def tiny(seed=0):
    torch.manual_seed(seed)
    return Tiny()


def compiled_or_skip(model, example):
    graphs = []

    def counting_backend(graph, example_inputs):
        graphs.append(graph)
        return torch._dynamo.lookup_backend(BACKEND)(graph, example_inputs)

    torch._dynamo.reset()
    ok, message = compile_model(model, example, backend=counting_backend)
    if not ok:
        pytest.skip(f"torch.compile cannot work here: {message}")
    assert graphs, "nothing was compiled"  # else the comparison below would compare eager with eager
    return model


def test_decide_pays_back_only_long_runs():
    assert decide("off", "cpu", steps=10**6, step_s=1.0) == (False, "compile=off")
    assert decide("on", "cpu", steps=1, step_s=0.001)[0] is True
    cost, saving = compile_module.CPU_COMPILE_S, compile_module.CPU_SAVING
    break_even = cost / saving / 0.05  # steps of 50 ms
    assert decide("auto", "cpu", steps=int(break_even * 0.9), step_s=0.05)[0] is False
    assert decide("auto", "cpu", steps=int(break_even * 1.1), step_s=0.05)[0] is True
    assert decide("auto", "cpu", steps=10**6, step_s=None)[0] is False  # nothing probed: no basis
    with pytest.raises(ValueError, match="compile='yes' not in"):
        decide("yes", "cpu", steps=1, step_s=1.0)


def test_compiled_equals_eager_within_tolerance():
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    eager, compiled = tiny(), compiled_or_skip(tiny(), x)
    for model in (eager, compiled):  # the trial step left the BN statistics as they were
        model.train()
        model(x).square().mean().backward()
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # in place: no _orig_mod. prefix
    torch.testing.assert_close(
        compiled.state_dict()["bn.running_mean"], eager.state_dict()["bn.running_mean"]
    )


def test_a_compiler_failure_falls_back_with_one_line():
    def broken_backend(graph, example_inputs):
        raise RuntimeError("no C++ compiler found\nlong traceback text")

    model, x = tiny(), torch.randn(4, 1, 8, 8)
    reference = tiny()(x)
    torch._dynamo.reset()  # dynamo would reuse another test's graph of the same code and never call the backend
    ok, message = compile_model(model, x, backend=broken_backend)
    assert ok is False and "\n" not in message and "running uncompiled" in message
    assert "no C++ compiler found" in message
    torch.testing.assert_close(model(x), reference)  # still usable, uncompiled, weights untouched


def test_strip_compile_prefix_loads_a_wrapper_state_dict_into_a_plain_model():
    wrapped = torch.compile(tiny(1), backend=BACKEND)
    assert all(key.startswith("_orig_mod.") for key in wrapped.state_dict())
    plain = tiny(2)
    plain.load_state_dict(strip_compile_prefix(wrapped.state_dict()))
    for key, value in tiny(1).state_dict().items():
        assert torch.equal(plain.state_dict()[key], value)
    assert unwrap(wrapped) is wrapped._orig_mod and unwrap(plain) is plain


def test_compiled_run_with_ema_saves_plain_checkpoints_that_load_uncompiled_and_resume(tmp_path, monkeypatch):
    monkeypatch.setattr(compile_module, "compile_model", functools.partial(compile_model, backend=BACKEND))
    overrides = ["epochs=2", "compile=on", "train.ema_decay=0.9", "precision=fp32", "device=cpu",
                 f"output_dir={tmp_path}"]  # fmt: skip
    cfg = load_config(DIGITS, overrides)
    (tmp_path / "run").mkdir()
    run = build_run(cfg, tmp_path / "run", quiet=True)
    hardware = run.parts.checkpointer.meta["hardware"]
    if not hardware["compile"]:
        pytest.skip(f"torch.compile cannot work here: {hardware['compile_message']}")
    state = fit(run.model, run.loaders, run.parts, fit_options(cfg), None)
    results = finish_run(run, state)
    assert results["hardware"]["compile"] is True
    last = load_checkpoint(run.parts.checkpointer.latest("last"), default_kind="last")
    assert not any("_orig_mod" in key for key in last.weights)
    # Loaded uncompiled, `last` gives what the compiled model gives (EMA state rides along in state.pt).
    model, _ = load_model(run.parts.checkpointer.latest("last"), "cpu")
    assert getattr(model, "_compiled_call_impl", None) is None and "ema" in last.state
    x, y = next(iter(run.loaders.test))
    with torch.no_grad():
        expected = run.model.eval()(x)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    # Resume compiled for one more epoch, from the checkpoint.
    cfg2 = load_config(tmp_path / "run" / "config.yaml", ["epochs=3"])
    resumed = build_run(cfg2, tmp_path / "run", quiet=True)
    resumed.model.load_state_dict(last.weights)
    state2 = restore_training_state(last.state, resumed.loaders, resumed.parts)
    state2 = fit(resumed.model, resumed.loaders, resumed.parts, fit_options(cfg2), state2)
    assert state2.epoch == 3 and state2.history[:2] == state.history
    assert json.loads((tmp_path / "run" / "results.json").read_text())["hardware"]["compile"] is True
