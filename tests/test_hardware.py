"""trickbag.hardware and precision=auto: the CPU description, the probe, the choice per CPU class (faked timings),
the warning for an emulated bf16, the cached choice, and benchmarks/gpu_suite.sh's CPU dry run."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trickbag import hardware
from trickbag.config import load_config
from trickbag.models import build_model
from trickbag.precision import resolve_policy
from trickbag.run import build_run

REPO = Path(__file__).resolve().parent.parent
DIGITS = REPO / "recipes" / "digits.yaml"
CIFAR_FAST = {"widths": [64, 128], "stem_width": 32, "stem_kernel": 4, "pool_first": True}
# What the probe reads on the two CPU classes of issue 10 (fwd+bwd ms of 32 CIFAR images, 2 cores).
AVX512_BF16 = {"fp32/contiguous": 16.0, "bf16/contiguous": 12.0, "fp32/channels_last": 11.0,
               "bf16/channels_last": 6.0}  # fmt: skip
AVX2_ONLY = {"fp32/contiguous": 14.0, "bf16/contiguous": 980.0, "fp32/channels_last": 10.0,
             "bf16/channels_last": 700.0}  # fmt: skip


def test_cpu_info_lists_the_relevant_flags_of_proc_cpuinfo():
    info = hardware.cpu_info()
    assert set(info["flags"]) <= set(hardware.RELEVANT_FLAGS)
    assert info["threads"] == torch.get_num_threads()
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo")
    # Independent reading: the first "flags" line, split by hand.
    line = next(row for row in cpuinfo.read_text().splitlines() if row.startswith("flags"))
    present = set(line.split(":", 1)[1].split())
    assert info["flags"] == [flag for flag in hardware.RELEVANT_FLAGS if flag in present]
    model = next(row for row in cpuinfo.read_text().splitlines() if row.startswith("model name"))
    assert info["model"] == model.split(":", 1)[1].strip()


def test_probe_of_the_cifar_model_takes_under_a_second_and_leaves_no_trace():
    torch.manual_seed(0)
    model = build_model("cifar_fast", 10, **CIFAR_FAST)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    hardware.probe(model, (3, 32, 32), "cpu")  # the process's first oneDNN calls are not the probe's cost
    torch.manual_seed(1)
    started = time.perf_counter()
    timings = hardware.probe(model, (3, 32, 32), "cpu")
    elapsed = time.perf_counter() - started
    expected_keys = {"fp32/contiguous", "fp32/channels_last"}
    assert expected_keys <= set(timings) <= expected_keys | {"bf16/contiguous", "bf16/channels_last"}
    assert all(ms > 0 for ms in timings.values())
    assert elapsed < 1.0, f"probe took {elapsed:.2f} s"
    for key, value in model.state_dict().items():  # a copy was timed: weights and BN statistics unchanged
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in model.parameters())


def test_probe_restores_the_global_rng():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Dropout(0.5), torch.nn.Flatten(),
                                torch.nn.LazyLinear(5))  # fmt: skip
    model(torch.zeros(1, 3, 8, 8))
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    hardware.probe(model, (3, 8, 8), "cpu", batch_size=4, repeats=1)
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize(
    ("timings", "precision", "channels_last", "expected"),
    [
        (AVX512_BF16, "auto", "auto", ("bf16", True)),
        (AVX2_ONLY, "auto", "auto", ("fp32", True)),
        (AVX512_BF16, "auto", False, ("bf16", False)),
        (AVX512_BF16, "fp32", "auto", ("fp32", True)),
        # A tie is noise: the defaults stay (fp32, contiguous).
        (
            {
                "fp32/contiguous": 10.0,
                "bf16/contiguous": 9.5,
                "fp32/channels_last": 9.8,
                "bf16/channels_last": 9.6,
            },
            "auto",
            "auto",
            ("fp32", False),
        ),  # fmt: skip
        ({}, "auto", "auto", ("fp32", False)),
    ],
)
def test_choose_settings_per_cpu_class(timings, precision, channels_last, expected):
    chosen = hardware.choose_settings(timings, "cpu", precision=precision, channels_last=channels_last)
    assert (chosen["precision"], chosen["channels_last"]) == expected
    assert chosen["warning"] is None


def test_explicit_bf16_that_is_70x_slower_keeps_bf16_and_warns_with_the_factor():
    chosen = hardware.choose_settings(AVX2_ONLY, "cpu", precision="bf16", channels_last=True)
    assert chosen["precision"] == "bf16"
    assert "70.0x slower than fp32" in chosen["warning"]  # 700 / 10 ms in channels_last
    fast = hardware.choose_settings(AVX512_BF16, "cpu", precision="bf16", channels_last=True)
    assert fast["warning"] is None


def test_auto_on_cuda_is_bf16_where_supported_else_fp16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_policy("auto", "cuda") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_policy("auto", "cuda") == "fp16"
    assert resolve_policy("fp16", "cpu") == "fp16"  # explicit stays
    with pytest.raises(ValueError, match="precision 'fp8' is not one of"):
        resolve_policy("fp8", "cpu")


def _fake_probe(timings, calls):
    def probe(model, input_shape, device, *, policies, layouts, batch_size, **_):
        calls.append((tuple(policies), tuple(layouts), tuple(input_shape)))
        return {key: ms for key, ms in timings.items() if key.split("/")[0] in policies
                and (key.endswith("channels_last") in layouts)}  # fmt: skip

    return probe


@pytest.mark.parametrize(
    ("timings", "precision", "expected", "warns"),
    [
        (AVX512_BF16, "auto", "bf16", False),
        (AVX2_ONLY, "auto", "fp32", False),
        (AVX2_ONLY, "bf16", "bf16", True),
    ],
)
def test_a_run_on_each_cpu_class_picks_its_precision(
    tmp_path, monkeypatch, timings, precision, expected, warns
):
    monkeypatch.setenv("TRICKBAG_CACHE_DIR", str(tmp_path / "cache"))  # no choice cached by another test
    calls: list = []
    monkeypatch.setattr(hardware, "probe", _fake_probe(timings, calls))
    cfg = load_config(DIGITS, ["epochs=1", f"precision={precision}", "data.channels_last=auto", "device=cpu"])
    run = build_run(cfg, tmp_path, quiet=True)
    assert calls == [(("fp32", "bf16"), (False, True), (1, 8, 8))]
    assert run.parts.precision.policy == expected == cfg.precision  # resolved in place: config.yaml, resume
    assert cfg.data.channels_last is True  # faster in both tables
    assert next(p for p in run.model.parameters() if p.dim() == 4).is_contiguous(
        memory_format=torch.channels_last
    )
    assert f"precision: {expected}" in (tmp_path / "config.yaml").read_text()
    meta = run.parts.checkpointer.meta["hardware"]
    assert meta["precision"] == expected and meta["probe_ms"] == timings
    assert meta["requested"] == {"precision": precision, "channels_last": "auto", "compile": "auto"}
    log = (tmp_path / "train.log").read_text()
    assert f"precision {expected} (asked {precision})" in log
    assert ("70.0x slower than fp32" in log) == warns
    json.dumps(meta)  # plain data: goes into meta.json and results.json


def test_explicit_fp32_and_layout_probe_nothing(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(hardware, "probe", _fake_probe(AVX2_ONLY, calls))
    cfg = load_config(DIGITS, ["epochs=1", "precision=fp32", "data.channels_last=false", "device=cpu"])
    run = build_run(cfg, tmp_path, quiet=True)
    assert calls == [] and run.parts.checkpointer.meta["hardware"]["probe_ms"] == {}


def test_the_choice_is_cached_per_machine_and_model(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(hardware, "probe", _fake_probe(AVX512_BF16, calls))
    model = build_model("digits_cnn", 10, in_channels=1)
    first = hardware.choose(model, (1, 8, 8), "cpu", cache_dir=tmp_path)
    second = hardware.choose(model, (1, 8, 8), "cpu", cache_dir=tmp_path)
    assert len(calls) == 1 and not first["cached"] and second["cached"]
    assert {k: v for k, v in second.items() if k != "cached"} == {
        k: v for k, v in first.items() if k != "cached"
    }
    hardware.choose(model, (1, 8, 8), "cpu", cache_dir=tmp_path, precision="bf16")  # another request: probed
    hardware.choose(build_model("digits_cnn", 10, in_channels=3), (3, 8, 8), "cpu", cache_dir=tmp_path)
    assert len(calls) == 3


def test_gpu_suite_dry_run_passes_on_cpu(tmp_path):
    """benchmarks/gpu_suite.sh --dry-run: every step it would run on a GPU machine, checked here so it cannot rot."""
    result = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--dry-run", "--out", str(tmp_path / "gpu.md")],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin",
        "PYTHON": sys.executable, "TRICKBAG_CACHE_DIR": str(tmp_path / "cache"), "HOME": str(tmp_path)},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    written = (tmp_path / "gpu.md").read_text()
    assert "dry run" in written and "FAILED" not in written
