"""What this machine is, and which precision and memory layout are fastest on it: measured, not assumed.

A default tuned on one CPU can be 70x slower on the next: bf16 autocast runs at ~10,000 images/s on a CPU with
AVX512-BF16 and at ~145 on an AVX2-only one, where bf16 is emulated. So ``precision: auto`` and
``data.channels_last: auto`` are decided by a short probe of the *actual* model: one forward+backward of a small
batch per candidate (fp32 / bf16 autocast x contiguous / channels_last), after a warm-up step, well under a
second. ``choose`` returns the choice and the timings as a plain dict, which the run logs and stores in its
checkpoint meta and results.json.

    cpu_info()                         {"model": "AMD EPYC", "flags": ["avx2", "avx512_bf16", ...], ...}
    probe(model, (3, 32, 32), "cpu")   {"fp32/contiguous": 12.1, "bf16/channels_last": 6.3, ...} (ms)
    choose(model, (3, 32, 32), "cpu")  {"precision": "bf16", "channels_last": True, "probe_ms": {...}, ...}
"""

from __future__ import annotations

import copy
import hashlib
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trickbag.precision import bf16_warning, check_precision, resolve_policy

# The CPU flags that decide which precision is fast: bf16 is native with avx512_bf16 or AMX, emulated otherwise.
RELEVANT_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")
PROBE_BATCH = 32  # large enough to run the real kernels, small enough for ~10 ms per step on 2 cores
# channels_last must beat contiguous by this factor to be chosen (a tie is timing noise).
LAYOUT_MIN_SPEEDUP = 1.1
# A candidate whose warm-up step is this many times slower than the fastest warm-up is not timed again:
# emulated bf16 (70x) would cost seconds of probing. Generous, as first calls also build oneDNN kernels.
HOPELESS = 10.0


def cpu_info() -> dict[str, Any]:
    """The CPU's model name, its relevant instruction-set flags, torch's kernel level and thread count.

    Linux reads ``/proc/cpuinfo``; elsewhere the model is ``platform.processor()`` and the flags are unknown
    (an empty list: the probe decides anyway).
    """
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                model = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags.update(value.split())
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown")()
    return {
        "model": model,
        "flags": [flag for flag in RELEVANT_FLAGS if flag in flags],
        "capability": capability,  # the kernels torch dispatches to: DEFAULT, AVX2, AVX512, ...
        "threads": torch.get_num_threads(),
    }


def device_info(device: torch.device | str) -> dict[str, Any]:
    """``cpu_info()`` for a CPU; for CUDA the card's name, capability and whether it has bf16."""
    device = torch.device(device)
    if device.type != "cuda":
        return cpu_info()
    return {
        "model": torch.cuda.get_device_name(device),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
        "bf16": torch.cuda.is_bf16_supported(),
    }


def timing_key(policy: str, channels_last: bool) -> str:
    """The key of a candidate in the probe's timings (``choice["probe_ms"]``), e.g. "bf16/channels_last"."""
    return f"{policy}/{'channels_last' if channels_last else 'contiguous'}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_ms(model: nn.Module, x: torch.Tensor, policy: str, device: torch.device) -> float:
    """Milliseconds of one forward+backward of ``model`` on ``x`` under ``policy``'s autocast."""
    model.zero_grad(set_to_none=True)
    _sync(device)
    started = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16 if policy == "bf16" else torch.float16,
                        enabled=policy != "fp32"):  # fmt: skip
        out = model(x)
    # logsumexp costs what a cross-entropy costs and needs no labels.
    out.float().logsumexp(1).mean().backward()
    _sync(device)
    return (time.perf_counter() - started) * 1000.0


def probe(
    model: nn.Module,
    input_shape: tuple[int, ...] | list[int],
    device: torch.device | str,
    *,
    policies: tuple[str, ...] = ("fp32", "bf16"),
    layouts: tuple[bool, ...] = (False, True),
    batch_size: int = PROBE_BATCH,
    repeats: int = 5,
    budget_s: float = 0.5,
) -> dict[str, float]:
    """Forward+backward milliseconds of a copy of ``model`` for every (policy, layout) candidate.

    Each candidate gets one warm-up step (oneDNN/cuDNN build their kernels on the first call), then the
    minimum of ``repeats`` timed steps, the candidates taking turns; a candidate whose warm-up is already
    ``HOPELESS`` times slower than the fastest warm-up keeps its warm-up time and is not repeated. ``model`` itself is untouched (a copy is
    timed) and the global RNG is restored (dropout in the copy draws from it), so a run with a probe is
    exactly as reproducible as one without.

    Args:
        model: the run's model, any (N, C, H, W) -> (N, K) classifier, on ``device``.
        input_shape: (C, H, W) of one image.
        policies: "fp32", "fp16", "bf16"; a policy autocast cannot run here is left out of the result.
        layouts: False = contiguous (NCHW), True = channels_last (NHWC).
        budget_s: no timed round starts after this many seconds (the first always runs).
    Returns:
        {"fp32/contiguous": ms, "bf16/channels_last": ms, ...}
    """
    device = torch.device(device)
    if batch_size < 1 or repeats < 1:
        raise ValueError(f"batch_size={batch_size} and repeats={repeats} must be >= 1")
    if len(input_shape) != 3:
        raise ValueError(f"input_shape={tuple(input_shape)} must be (C, H, W)")
    runnable = []
    for policy in policies:
        try:
            check_precision(policy, device)
            runnable.append(policy)
        except ValueError:
            continue
    candidates = [(policy, channels_last) for channels_last in layouts for policy in runnable]
    timings: dict[str, float] = {}
    started, threads = time.perf_counter(), torch.get_num_threads()
    if device.type == "cpu":
        # One thread: on a shared machine, 2+ OpenMP threads stall at every barrier when another process holds
        # a core (steps of 1 s instead of 20 ms); the ratios between candidates are what matter here.
        torch.set_num_threads(1)
    try:
        timings = _time_candidates(
            model, input_shape, device, candidates, batch_size, repeats, budget_s, started
        )
    finally:
        torch.set_num_threads(threads)
    return timings


def _time_candidates(model, input_shape, device, candidates, batch_size, repeats, budget_s, started):
    layouts = sorted({layout for _, layout in candidates})
    timings: dict[str, float] = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        x = torch.randn(batch_size, *input_shape, generator=torch.Generator().manual_seed(0)).to(device)
        formats = {layout: torch.channels_last if layout else torch.contiguous_format for layout in layouts}
        copies = {
            layout: copy.deepcopy(model).train().to(memory_format=formats[layout]) for layout in layouts
        }
        batches = {layout: x.contiguous(memory_format=formats[layout]) for layout in layouts}
        for policy, layout in candidates:  # warm-up round
            timings[timing_key(policy, layout)] = _step_ms(copies[layout], batches[layout], policy, device)
        fastest = min(timings.values(), default=0.0)
        alive = [
            (p, layout) for p, layout in candidates if timings[timing_key(p, layout)] <= HOPELESS * fastest
        ]
        # Timed rounds take turns over the candidates, so a burst of load from other processes hits all alike.
        measured = {timing_key(*candidate): float("inf") for candidate in alive}
        for round_index in range(repeats):
            if round_index > 0 and time.perf_counter() - started > budget_s:
                break  # a loaded machine: one timed round is what it can afford
            for policy, layout in alive:
                step = _step_ms(copies[layout], batches[layout], policy, device)
                measured[timing_key(policy, layout)] = min(measured[timing_key(policy, layout)], step)
        timings.update(measured)
    return timings


def policy_times(timings_ms: dict[str, float], channels_last: bool | None = None) -> dict[str, float]:
    """{policy: fastest ms} over the layouts (or over ``channels_last`` alone when it is given)."""
    result: dict[str, float] = {}
    for key, ms in timings_ms.items():
        policy, layout = key.split("/")
        if channels_last is not None and (layout == "channels_last") != channels_last:
            continue
        result[policy] = min(ms, result.get(policy, ms))
    return result


def choose_settings(
    timings_ms: dict[str, float] | None,
    device: torch.device | str,
    *,
    precision: str = "auto",
    channels_last: bool | str = "auto",
) -> dict[str, Any]:
    """The precision and layout to run, from the probe's ``timings_ms`` (pure: tests fake the timings).

    Precision: ``trickbag.precision.resolve_policy`` on the fastest time of each policy (in the fixed layout
    when the layout is not auto). Layout: channels_last when it is ``LAYOUT_MIN_SPEEDUP`` faster in the chosen
    precision; without timings, contiguous. Returns {"precision", "channels_last", "warning"}.
    """
    if channels_last not in ("auto", True, False):
        raise ValueError(f"channels_last={channels_last!r} not in ('auto', True, False)")
    timings_ms = timings_ms or {}
    fixed_layout = None if channels_last == "auto" else channels_last
    policy = resolve_policy(precision, device, policy_times(timings_ms, fixed_layout))
    layout = channels_last
    if channels_last == "auto":
        contiguous, nhwc = timings_ms.get(timing_key(policy, False)), timings_ms.get(timing_key(policy, True))
        layout = contiguous is not None and nhwc is not None and contiguous >= LAYOUT_MIN_SPEEDUP * nhwc
    warning = bf16_warning(precision, device, policy_times(timings_ms, layout))
    return {"precision": policy, "channels_last": bool(layout), "warning": warning}


def choose(
    model: nn.Module,
    input_shape: tuple[int, ...] | list[int],
    device: torch.device | str,
    *,
    precision: str = "auto",
    channels_last: bool | str = "auto",
    batch_size: int = PROBE_BATCH,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Probe what needs probing and choose; everything as a plain (JSON-able) dict.

    Probed: on a CPU the precisions when ``precision`` is auto (fp32 vs bf16) or an explicit bf16 (to warn
    when it is emulated); the layouts when ``channels_last`` is auto (on any device). CUDA's auto precision
    needs no probe (bf16 where the card has it, else fp16). Nothing to decide: no probe, ``probe_ms`` empty.

    With ``cache_dir`` the choice is kept in ``cache_dir/probes/<key>.json``, keyed by the hardware, torch,
    threads, the model's architecture, the input and the request: later runs of the same model on the same
    machine reuse it (``"cached": true``), so they make the same choice and repeat bit for bit, as a run
    without ``auto`` does. Delete the folder to probe again.

    Returns:
        {"precision": str, "channels_last": bool, "requested": {...}, "probe_ms": {key: ms},
         "probe_s": float, "device": device_info(device), "warning": str | None, "cached": bool}
    """
    device = torch.device(device)
    path = None
    if cache_dir is not None:
        key = {"device": device_info(device), "torch": torch.__version__, "model": repr(model),
               "input": list(input_shape), "batch": batch_size, "precision": precision,
               "channels_last": channels_last, "version": 1}  # fmt: skip
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:20]
        path = Path(cache_dir) / "probes" / f"{digest}.json"
        if path.is_file():
            try:
                return {**json.loads(path.read_text(encoding="utf-8")), "cached": True}
            except (OSError, ValueError):
                pass  # unreadable or half-written: probe again and rewrite it
    policies: tuple[str, ...] = ()
    if device.type == "cpu" and precision in ("auto", "bf16"):
        policies = ("fp32", "bf16")
    elif channels_last == "auto":
        policies = (resolve_policy(precision, device),)
    layouts = (False, True) if channels_last == "auto" else (bool(channels_last),)
    started = time.perf_counter()
    timings = {}
    if policies:
        timings = probe(model, input_shape, device, policies=policies, layouts=layouts, batch_size=batch_size)
    probe_s = time.perf_counter() - started
    chosen = choose_settings(timings, device, precision=precision, channels_last=channels_last)
    result = {
        **chosen,
        "requested": {"precision": precision, "channels_last": channels_last},
        "probe_ms": {name: round(ms, 3) for name, ms in timings.items()},
        "probe_s": round(probe_s, 3),
        "device": device_info(device),
        "cached": False,
    }
    if path is not None and timings:
        from trickbag.checkpoint import atomic_write_bytes

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, json.dumps(result, indent=2).encode("utf-8"))
        except OSError:
            pass  # a read-only cache only costs the next run another probe
    return result


def describe(choice: dict[str, Any]) -> str:
    """One log line: what was chosen, from what request, on which hardware, with the probe's timings."""
    requested = choice.get("requested", {})
    hardware = choice.get("device", {})
    flags = hardware.get("flags")
    where = hardware.get("model", "?") + (
        f" ({', '.join(flags) or 'no avx2/avx512'})" if flags is not None else ""
    )
    timings = ", ".join(f"{key} {ms:.1f} ms" for key, ms in choice.get("probe_ms", {}).items())
    line = (
        f"precision {choice['precision']} (asked {requested.get('precision', '?')}), channels_last "
        f"{str(choice['channels_last']).lower()} (asked {str(requested.get('channels_last', '?')).lower()})"
    )
    if "compile" in choice:
        line += f", compile {'on' if choice['compile'] else 'off'} (asked {requested.get('compile', '?')})"
    line += f" on {where}"
    if timings:
        how = "cached probe" if choice.get("cached") else f"probe ({choice.get('probe_s', 0):.2f} s)"
        line += f"; {how}, fwd+bwd of {PROBE_BATCH} images: {timings}"
    return line
