"""``torch.compile`` as a run option: off, on, or auto (only when the run is long enough to pay it back).

The model is compiled *in place* (``nn.Module.compile``): it stays the same object with the same
``state_dict`` keys, so checkpoints never carry the ``_orig_mod.`` prefix of a ``torch.compile`` wrapper, load
into an uncompiled model and resume into a compiled one; the EMA's copy (made before compiling) and
``copy.deepcopy`` give uncompiled modules. State dicts written by someone else's wrapper are cleaned by
``strip_compile_prefix``.

Compiling is lazy (it happens on the first call), and it fails there when the C++ toolchain is missing or an op
is unsupported. ``compile_model`` therefore runs one forward+backward at once and, on any failure, undoes the
compile and returns the reason: the run says so in one line and trains uncompiled; never a traceback.

Break-even (``decide``): compiling costs a fixed time C (tens of seconds on a 2-core CPU, for both the training
graph and the evaluation graph) and saves a fraction f of every step of time t, so it pays back after C / (f t)
steps. The constants below were measured on the cifar_fast model (see benchmarks/RESULTS.md, "compile").
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
from torch import nn

CompileMode = Literal["off", "on", "auto"]
PREFIX = "_orig_mod."

# Measured on a 2-core AMD EPYC (AVX512-BF16), torch 2.13, cifar_fast batch 256, channels_last (RESULTS.md):
# inductor's compile of the training graph plus the evaluation graph, and the saving per training step.
CPU_COMPILE_S = 40.0
CPU_SAVING = 0.10
# GPUs compile faster than a busy 2-core CPU and save more per step (fusion removes memory-bound kernels).
CUDA_COMPILE_S = 40.0
CUDA_SAVING = 0.30


def strip_compile_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The state dict of a ``torch.compile`` wrapper with every ``_orig_mod.`` removed (others unchanged)."""
    return {key.replace(PREFIX, ""): value for key, value in state_dict.items()}


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``torch.compile`` wrapper (``OptimizedModule``); any other module as it is."""
    return getattr(model, "_orig_mod", model)


def decide(mode: str, device: torch.device | str, *, steps: int, step_s: float | None) -> tuple[bool, str]:
    """Whether to compile, and why, for a run of ``steps`` training steps of ``step_s`` seconds each.

    Args:
        mode: "off", "on" or "auto".
        steps: planned training steps (updates x micro-batches) of the run.
        step_s: estimated seconds per step (e.g. the probe's time scaled to the batch); None: unknown.
    Returns:
        (compile, reason): auto compiles when ``steps x step_s x saving`` exceeds the compile time.
    """
    if mode not in ("off", "on", "auto"):
        raise ValueError(f"compile={mode!r} not in ('off', 'on', 'auto')")
    if mode != "auto":
        return mode == "on", f"compile={mode}"
    cuda = torch.device(device).type == "cuda"
    cost, saving = (CUDA_COMPILE_S, CUDA_SAVING) if cuda else (CPU_COMPILE_S, CPU_SAVING)
    if step_s is None:  # nothing was probed (precision and layout were given): no basis to pay the cost
        return False, "auto: step time unknown (nothing probed): not compiled"
    saved = steps * step_s * saving
    verdict = saved > cost
    return verdict, (
        f"auto: would save ~{saved:.0f} s ({steps} steps x {step_s * 1000:.1f} ms x {saving:.0%}) "
        f"{'>' if verdict else '<='} ~{cost:.0f} s to compile"
    )


def compile_model(
    model: nn.Module,
    example: torch.Tensor,
    *,
    autocast: Any = None,
    backend: str = "inductor",
) -> tuple[bool, str]:
    """Compile ``model`` in place and run one forward+backward of ``example`` so a failure shows now.

    Args:
        model: compiled in place (same object, same state_dict keys).
        example: (N, C, H, W) a batch like the training batches (same dtype, device and memory format).
        autocast: a context manager factory for the step (e.g. ``Precision.autocast``); None: none.
        backend: torch.compile's backend ("inductor" needs a C++ compiler on CPU; "aot_eager" does not).
    Returns:
        (compiled, message): (True, "compiled in 31.2 s") or (False, one line saying why, and that the run
        continues uncompiled). The gradients of the trial step are cleared.
    """
    if not hasattr(model, "compile"):
        return False, f"torch {torch.__version__} has no nn.Module.compile: running uncompiled"
    started = time.perf_counter()
    was_training = model.training
    # The trial step must leave no trace: BatchNorm's running statistics are restored, dropout's RNG forked.
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    try:
        model.compile(backend=backend)
        model.train()
        with torch.random.fork_rng(devices=[example.device] if example.device.type == "cuda" else []):
            with autocast() if autocast is not None else torch.autocast(example.device.type, enabled=False):
                out = model(example)
            out.float().logsumexp(1).mean().backward()
    except Exception as error:  # noqa: BLE001 - any compiler failure must fall back, not stop the run
        model._compiled_call_impl = None  # undo nn.Module.compile (the attribute it sets)
        cause = getattr(error, "inner_exception", None) or error  # dynamo wraps the compiler's own error
        first = (str(cause).strip().splitlines() or [""])[0]
        return False, f"torch.compile failed ({type(cause).__name__}: {first[:200]}): running uncompiled"
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.copy_(buffers[name])
    return True, f"compiled ({backend}) in {time.perf_counter() - started:.1f} s"
