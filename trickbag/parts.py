"""The trainer's parts from a validated config, one small function each: the model (and its initialisation),
precision / layout / compile by the hardware probe, the training loader, input statistics, loss, sampler, mixer,
teacher. ``trickbag.run.build_run`` composes them in order; each is usable on its own (tests call them directly).
Heavy imports happen inside the functions.
"""

from __future__ import annotations

import math
import os
from typing import Any


def build_model_for(cfg, num_classes: int, in_channels: int, device):
    import torch

    from trickbag.models import ModelOptionError, build_model

    try:
        model = build_model(cfg.model.name, num_classes, in_channels=in_channels, **cfg.model.options)
    except ModelOptionError as error:  # say where in the config the refused value sits
        raise ValueError(f"model.options: {error}") from error
    if cfg.model.zero_init_residual_bn:
        from trickbag.init import zero_init_residual_bn

        zero_init_residual_bn(model)
    if cfg.model.identity_init:
        from trickbag.init import identity_init_convs

        if identity_init_convs(model) == 0:
            raise ValueError(
                f"model.identity_init: {cfg.model.name!r} has no stride-1 odd-sized convolution to initialise; "
                "set model.identity_init: false"
            )
    model = model.to(device)
    if cfg.data.channels_last is True:  # "auto" is resolved by build_run's probe (trickbag.hardware.choose)
        model = model.to(memory_format=torch.channels_last)
    return model


def choose_hardware_settings(cfg, model, image_shape, device, num_train: int, log=print) -> dict[str, Any]:
    """Resolve ``precision``, ``data.channels_last`` and ``compile`` of ``cfg`` in place, by a probe of ``model``.

    Writes the concrete choices back into ``cfg`` (so config.yaml, the checkpoint meta and a resume use them);
    converts ``model`` to channels_last when chosen; logs one line, plus the warning when an explicit bf16 was
    measured much slower than fp32. Several processes: rank 0's choice is every rank's. Returns the choice
    dict (``trickbag.hardware.choose``) with ``compile``, ``compile_reason`` and ``requested.compile`` added.
    """
    import torch

    from trickbag import distributed, hardware
    from trickbag.cache import cache_folder
    from trickbag.compile import decide

    requested_layout = cfg.data.channels_last
    choice = hardware.choose(
        model, image_shape, device, precision=cfg.precision, channels_last=requested_layout,
        batch_size=min(cfg.batch_size, hardware.PROBE_BATCH), cache_dir=cache_folder(cfg.data.cache_dir),
    )  # fmt: skip
    choice = distributed.broadcast_object(choice)
    timings = choice["probe_ms"]
    chosen_key = hardware.timing_key(choice["precision"], choice["channels_last"])
    step_s = None
    # The probe's 1-thread step, scaled to the batch: an estimate, on the high side.
    if chosen_key in timings:
        step_s = timings[chosen_key] / 1000 * cfg.batch_size / min(cfg.batch_size, hardware.PROBE_BATCH)
    steps = cfg.epochs * math.ceil(num_train / cfg.batch_size)
    choice["compile"], choice["compile_reason"] = decide(cfg.compile, device, steps=steps, step_s=step_s)
    choice["requested"]["compile"] = cfg.compile
    cfg.precision, cfg.data.channels_last = choice["precision"], choice["channels_last"]
    if choice["channels_last"] and requested_layout == "auto":
        model.to(memory_format=torch.channels_last)
    log(hardware.describe(choice))
    if choice["warning"]:
        log(choice["warning"])
    return choice


def apply_runtime_settings(cfg) -> None:
    """Threads and deterministic algorithms, process-wide, before anything is built."""
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        # cuBLAS needs a fixed workspace for deterministic matmuls; it must be set before CUDA starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)


def train_loader_for(cfg, train_set, common: dict[str, Any], log=print):
    """The training loader: ``BatchLoader`` over the decoded images, or the streaming loader when the set was
    left on disk; checks the options that need the in-memory one. ``common``: device, mean/std, layout, shard."""
    from trickbag import data, streaming

    world = common["world_size"]
    streamed = train_set.images is None
    if world > 1 and len(train_set) < cfg.batch_size * world:
        raise ValueError(
            f"{len(train_set)} training images are fewer than one global batch (batch_size={cfg.batch_size} "
            f"per process x {world} processes); lower batch_size or use fewer processes"
        )
    if cfg.data.train_sizes is not None:
        if streamed:  # in_memory=auto chose to stream this (large) training set
            raise ValueError(
                "data.train_sizes needs the in-memory loader, but this training set is streamed (larger than "
                "data.memory_budget_gb); set data.image_size smaller instead"
            )
        try:  # BatchLoader checks them too; here the message names the key to change
            data.check_sizes(cfg.data.train_sizes, tuple(train_set.images.shape[2:]))
        except ValueError as error:
            raise ValueError(f"data.train_sizes: {error}") from None
        log(f"progressive resizing: training images at {cfg.data.train_sizes} per epoch (the last repeats)")
    if streamed and cfg.data.sampling != "none":  # in_memory=auto chose to stream this (large) training set
        raise ValueError(
            f"data.sampling={cfg.data.sampling!r} needs the in-memory loader, but this training set is streamed "
            "(larger than data.memory_budget_gb); use loss.class_weights with loss.drw_epoch instead"
        )
    if streamed:
        train_loader = streaming.loader_for(
            cfg.data, train_set, train=True, batch_size=cfg.batch_size, seed=cfg.seed,
            drop_last=len(train_set) >= cfg.batch_size or world > 1, **common,
        )  # fmt: skip
        log(
            f"streaming {len(train_set)} training images, decoded per batch by {train_loader.num_workers} worker "
            "process(es); "
            f"JPEG decoder: {train_loader.decoder}"
            + (" (pip install 'trickbag[fastjpeg]' decodes faster)" if train_loader.decoder == "pil" else "")
        )
    else:
        train_loader = data.BatchLoader(
            train_set.images,
            train_set.labels,
            batch_size=cfg.batch_size,
            shuffle=True,
            drop_last=len(train_set) >= cfg.batch_size or world > 1,  # DDP: equal full batches on every rank
            seed=cfg.seed,
            crop_padding=cfg.data.crop_padding,
            flip=cfg.data.flip,
            sampler=sampler_from_config(cfg, train_set.labels),
            sizes=cfg.data.train_sizes,
            **common,
        )
    return train_loader


def mixer_from_config(cfg, num_classes: int):
    """``trickbag.mixing.BatchMixer`` for ``cfg.mixing``, or None when no mixing is enabled."""
    if not cfg.mixing.enabled:
        return None
    from trickbag.mixing import BatchMixer

    m = cfg.mixing
    return BatchMixer(
        num_classes=num_classes,
        mixup_alpha=m.mixup_alpha,
        cutmix_alpha=m.cutmix_alpha,
        fmix_alpha=m.fmix_alpha,
        prob=m.prob,
        mode=m.mode,
        label_smoothing=cfg.loss.label_smoothing,
        smoothing_style=cfg.loss.smoothing_style,
        off_epoch=m.off_epoch,
        seed=cfg.seed,
    )


def compile_for_run(cfg, model, image_shape, device, precision, hardware: dict[str, Any], log=print) -> None:
    """Compile ``model`` in place (one forward+backward now); on failure ``hardware["compile"]`` turns False
    and the run trains uncompiled, saying why in one line."""
    import torch

    from trickbag.compile import compile_model

    generator = torch.Generator().manual_seed(0)  # not the global RNG: compiling changes no random draw
    example = torch.randn(cfg.batch_size, *image_shape, generator=generator).to(device)
    if cfg.data.channels_last:
        example = example.contiguous(memory_format=torch.channels_last)
    hardware["compile"], message = compile_model(model, example, autocast=precision.autocast)
    hardware["compile_message"] = message
    log(f"compile: {hardware['compile_reason']}; {message}")


def input_statistics(cfg, model, train_set, log=print) -> tuple[list[float], list[float]]:
    """(mean, std) that normalise the run's inputs; loads ``model.pretrained`` into ``model`` (new head).

    The pretrained weights' own statistics when stored with them (the backbone learned on inputs normalised
    so); else the training set's (estimated from a sample when it is streamed).
    """
    from trickbag import data
    from trickbag.streaming import sample_stats

    stored = None
    if cfg.model.pretrained:
        from trickbag.finetune import load_pretrained

        loaded = load_pretrained(model, cfg.model.pretrained)
        stored = loaded["normalization"]
        log(
            f"pretrained {cfg.model.pretrained}: {len(loaded['loaded'])} tensors loaded, head {loaded['new_head']} "
            f"new for {len(train_set.classes)} classes; normalisation "
            + ("stored with the weights" if stored else "of the training set (none stored with the weights)")
        )
    if stored is not None:
        return list(stored["mean"]), list(stored["std"])
    if train_set.images is None:
        return sample_stats(train_set.paths, cfg.data.image_size, aspect=cfg.data.aspect, seed=cfg.seed)
    return data.channel_stats(train_set.images)


def teacher_for(cfg, device, mean, std):
    """The distillation teacher in eval mode (None without one), fed inputs in its own normalisation."""
    if not cfg.distill.teacher:
        return None
    from trickbag.finetune import Renormalized
    from trickbag.run import load_model  # not at the top: trickbag.run imports this module

    teacher, ckpt = load_model(cfg.distill.teacher, device)
    own = [float(v) for v in ckpt.meta["mean"]], [float(v) for v in ckpt.meta["std"]]
    if own == ([float(v) for v in mean], [float(v) for v in std]):
        return teacher
    return Renormalized(teacher, mean, std, *own).to(device).eval()


def loss_from_config(cfg, num_classes: int, weight=None, *, class_counts=None):
    """The run's loss function (class ``weight`` (C,) or None) from its ``loss`` section.

    ``class_counts`` (C,), the training label counts, is required by kinds ldam, logit_adjusted and
    balanced_softmax. With ``loss.drw_epoch`` the weights are deferred: the loss has ``set_epoch(epoch)``.
    """
    import torch

    from trickbag.longtail import LONGTAIL_KINDS, DeferredReweighting, LongTailLoss
    from trickbag.losses import ClassifierLoss

    section = cfg.loss
    weight = None if weight is None else torch.as_tensor(weight, dtype=torch.float32)
    deferred = section.drw_epoch is not None and weight is not None
    if section.kind in LONGTAIL_KINDS:
        if class_counts is None:
            raise ValueError(f"loss.kind={section.kind!r} needs the training class_counts (C,)")
        loss = LongTailLoss(
            section.kind,
            class_counts=class_counts,
            tau=section.tau,
            max_margin=section.ldam_max_margin,
            scale=section.ldam_scale,
            label_smoothing=section.label_smoothing,
            smoothing_style=section.smoothing_style,
            weight=None if deferred else weight,
        )
    else:
        loss = ClassifierLoss(
            section.kind,
            num_classes=num_classes,
            label_smoothing=section.label_smoothing,
            smoothing_style=section.smoothing_style,
            focal_gamma=section.focal_gamma,
            weight=None if deferred else weight,
        )
    return DeferredReweighting(loss, weight, section.drw_epoch) if deferred else loss


def sampler_from_config(cfg, labels):
    """The training loader's ``ClassBalancedSampler`` for ``data.sampling`` (deferred by ``loss.drw_epoch``)."""
    if cfg.data.sampling == "none":
        return None
    from trickbag.longtail import ClassBalancedSampler

    return ClassBalancedSampler(labels, cfg.data.sampling, seed=cfg.seed, start_epoch=cfg.loss.drw_epoch or 0)


def attach_posthoc_adjustment(model, cfg, class_counts) -> None:
    """With ``eval.logit_adjust_tau`` > 0, eval-mode logits of ``model`` become z - tau log(prior)."""
    if cfg.eval.logit_adjust_tau > 0:
        from trickbag.longtail import PosthocAdjustment

        PosthocAdjustment(class_counts, cfg.eval.logit_adjust_tau).attach(model)
