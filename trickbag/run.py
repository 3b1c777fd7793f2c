"""Wiring from a validated config to the trainer's parts: data, model, loss, optimizer, schedule, checkpoints.

``build_run(cfg, run_dir)`` returns everything ``trickbag.train.fit`` needs, so a Python user can reuse the
wiring of ``trickbag train`` and still call ``fit`` (or their own loop) themselves. Heavy imports happen inside
the functions: ``trickbag --help`` imports this module.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Run:
    cfg: Any
    run_dir: Path
    model: Any
    loaders: Any
    parts: Any
    classes: list[str]


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available; use device=cpu or device=auto")
    return device


def load_datasets(cfg, log=print):
    """(train, val, test) ImageSets of the config's data section, in their three roles.

    * train: fitted on;
    * val: chooses (best checkpoints, early stopping, plateau schedule): ``root/val_dir`` when that folder
      exists, else a stratified ``data.val_fraction`` split of train drawn with ``data.split_seed`` (the same
      split for every run seed, so runs of an ablation are chosen on the same images); None when the fraction
      is 0 and there is no val folder;
    * test: reported only, never used to choose anything: the digits test split, ``root/test_dir``, or
      ``data.test_csv``; None when the data has none.

    Skipped bad images are reported through ``log``. Streamed sets (``trickbag.streaming.streams``) are listed,
    not decoded: their ``images`` is None.
    """
    from trickbag import data
    from trickbag.streaming import streams

    section = cfg.data
    val = test = None
    options = {
        "cache_dir": section.cache_dir,
        "skip_bad_images": section.skip_bad_images,
        "num_workers": section.num_workers,
        "decode": not streams(section),
    }
    if section.image_size is not None:  # mixed sizes: every image fitted as evaluation fits it
        options.update(
            size=(section.image_size,) * 2, aspect=section.aspect, crop_fraction=section.crop_fraction
        )
    if section.kind == "digits":
        train, test = data.load_digits()
    elif section.kind == "image_folder":
        if section.root is None:
            raise ValueError(
                "data.root is required for data.kind=image_folder (e.g. data.root=/data/cifar10)"
            )
        root = Path(section.root)
        train = data.load_image_folder(root / section.train_dir, **options)
        if (root / section.val_dir).is_dir():
            val = align_classes(data.load_image_folder(root / section.val_dir, **options), train.classes)
        if (root / section.test_dir).is_dir():
            test = align_classes(data.load_image_folder(root / section.test_dir, **options), train.classes)
    else:
        if section.csv is None:
            raise ValueError("data.csv is required for data.kind=csv (e.g. data.csv=labels.csv)")
        train = data.load_csv(section.csv, root=section.root, **options)
        if section.test_csv is not None:
            test = data.load_csv(section.test_csv, root=section.root, **options)
            test = align_classes(test, train.classes)
    for imageset in (train, val, test):
        if imageset is not None and imageset.skipped:
            log(
                f"skipped {len(imageset.skipped)} unreadable images (data.skip_bad_images=true): {imageset.skipped}"
            )
    if val is None and section.val_fraction > 0:
        train, val = data.split_validation(train, section.val_fraction, section.split_seed)
    return train, val, test


def align_classes(imageset, classes: list[str]):
    """Relabel ``imageset`` to the class indices of ``classes`` (a test folder may lack some classes)."""
    import torch

    unknown = [name for name in imageset.classes if name not in classes]
    if unknown:
        raise ValueError(f"class folders {unknown} are not among the training classes {classes}")
    mapping = torch.tensor([classes.index(name) for name in imageset.classes], dtype=torch.int64)
    imageset.labels = mapping[imageset.labels]
    imageset.classes = list(classes)
    return imageset


def match_channels(images, channels: int):
    """(N, C, H, W) uint8 to ``channels`` channels: RGB -> grey by the mean, grey -> repeated."""
    import torch

    if images.shape[1] == channels:
        return images
    if channels == 1:
        return images.float().mean(1, keepdim=True).round().to(torch.uint8)
    return images[:, :1].expand(-1, channels, -1, -1).contiguous()


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
    chosen_key = f"{choice['precision']}/{'channels_last' if choice['channels_last'] else 'contiguous'}"
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


def build_run(cfg, run_dir: Path, *, quiet: bool = False) -> Run:
    """Data, model and trainer parts for ``cfg``; resolves ``eval.best_metric: auto`` from the training labels."""
    import torch

    from trickbag import data, distributed, streaming
    from trickbag.checkpoint import Checkpointer
    from trickbag.config import build_optimizer_from_config, build_scheduler, config_to_dict, config_to_yaml
    from trickbag.finetune import BackboneFreezer
    from trickbag.losses import class_weights
    from trickbag.metrics import ClassificationMetrics
    from trickbag.metrics.advice import advise
    from trickbag.precision import Precision
    from trickbag.runlog import RunLogger
    from trickbag.train import Loaders, Parts

    apply_runtime_settings(cfg)
    # Under torchrun (a process group with world > 1): rank 0 alone writes files; each rank has its device.
    rank, world = distributed.rank(), distributed.world_size()
    main = rank == 0
    logger = RunLogger(run_dir if main else None, tensorboard=cfg.logging.tensorboard and main,
                       quiet=quiet or not main)  # fmt: skip
    device = resolve_device(cfg.device) if world == 1 else distributed.process_device(cfg.device)
    train_set, val_set, test_set = load_datasets(cfg, logger.info)
    classes, num_classes = list(train_set.classes), len(train_set.classes)
    counts = torch.bincount(train_set.labels, minlength=num_classes)
    advice = advise(train_set.labels, class_names=classes)
    if cfg.eval.best_metric == "auto":
        cfg.eval.best_metric = advice.best_metric
    top_k = requested_top_k(cfg, num_classes)  # before any training: a bad name fails now, not after an epoch
    rebalanced = cfg.loss.class_weights != "none" or cfg.loss.kind not in ("ce", "focal")
    rebalanced = rebalanced or cfg.data.sampling != "none" or cfg.eval.logit_adjust_tau > 0
    if advice.recommend_class_weights and not rebalanced:
        logger.info(
            f"class imbalance {advice.imbalance_ratio:.1f}:1 - consider loss.kind=logit_adjusted, or "
            "loss.kind=ldam with loss.class_weights=effective_number and loss.drw_epoch (recipe longtail_fast)"
        )
    streamed = train_set.images is None  # trickbag.streaming: decoded per batch by worker processes
    image_shape = (
        [3, cfg.data.image_size, cfg.data.image_size] if streamed else list(train_set.images.shape[1:])
    )
    torch.manual_seed(cfg.seed)  # model initialisation and dropout draw from torch's global generator
    model = build_model_for(cfg, num_classes, image_shape[0], device)
    mean, std = input_statistics(cfg, model, train_set, logger.info)
    # Before SyncBatchNorm (the probe's steps must not be collectives) and before the loaders (their layout).
    hardware = choose_hardware_settings(cfg, model, image_shape, device, len(train_set), logger.info)
    if cfg.train.sync_bn and world > 1:  # before the optimizer and the EMA (same parameter objects)
        model = distributed.convert_sync_batchnorm(model)
    attach_posthoc_adjustment(model, cfg, counts.tolist())  # before the EMA copies the model (and its hook)
    common = {"device": device, "mean": mean, "std": std, "channels_last": cfg.data.channels_last,
              "rank": rank, "world_size": world}  # fmt: skip
    train_loader = train_loader_for(cfg, train_set, common, logger.info)
    # Evaluation has no backward pass: larger batches cost no more memory than a training step.
    eval_batch = max(cfg.batch_size, 256)
    val_loader, test_loader = (
        None if imageset is None
        else streaming.loader_for(cfg.data, imageset, train=False, batch_size=eval_batch, **common) if streamed
        else data.BatchLoader.for_eval(imageset.images, imageset.labels, batch_size=eval_batch, **common)
        for imageset in (val_set, test_set)
    )  # fmt: skip
    # The linear scaling rule sees the global batch: per process x accumulate x processes.
    optimizer = build_optimizer_from_config(model, cfg.optimizer, cfg.effective_batch_size * world)
    updates_per_epoch = math.ceil(len(train_loader) / cfg.accumulate)
    scheduler = build_scheduler(optimizer, cfg.schedule, steps_per_epoch=updates_per_epoch, epochs=cfg.epochs)
    weight = None
    if cfg.loss.class_weights != "none":
        weight = class_weights(counts, method=cfg.loss.class_weights, beta=cfg.loss.beta)
    loss_fn = loss_from_config(cfg, num_classes, weight, class_counts=counts.tolist())
    mixer = mixer_from_config(cfg, num_classes)
    ema = None
    if cfg.train.ema_decay is not None:
        from trickbag.ema import ModelEMA

        ema = ModelEMA(model, cfg.train.ema_decay)
    precision = Precision(cfg.precision, device)
    # After the EMA's copy, which stays uncompiled; in place, so the state_dict keys are unchanged.
    if hardware["compile"]:
        compile_for_run(cfg, model, image_shape, device, precision, hardware, logger.info)
    teacher = teacher_for(cfg, device, mean, std)
    meta = {
        "config": config_to_dict(cfg),
        "classes": classes,
        "image_shape": image_shape,
        "preprocess": streaming.preprocessing(cfg.data, image_shape),  # eval/predict fit any photo like this
        "mean": mean,
        "std": std,
        "class_weights": weight.tolist() if weight is not None else None,  # so `eval` computes the same loss
        "class_counts": counts.tolist(),  # training label counts: priors, LDAM margins, post-hoc adjustment
        "updates_per_epoch": updates_per_epoch,  # with base_lr: `trickbag report` redraws the LR per update
        "base_lr": float(optimizer.param_groups[0]["initial_lr"]),
        "hardware": hardware,  # the probe's choice of precision / layout / compile, and its timings
    }
    if world > 1:
        meta["world_size"] = world  # informative: a resume may use another number of processes
    if main:
        (run_dir / "config.yaml").write_text(config_to_yaml(cfg), encoding="utf-8")
    log_run_summary(cfg, run_dir, device, world, (train_set, val_set, test_set), logger.info)
    parts = Parts(
        loss_fn=loss_fn,
        optimizer=optimizer,
        scheduler=scheduler,
        precision=precision,
        metrics=ClassificationMetrics(num_classes, class_names=classes, top_k=top_k, zero_division=0.0),
        mixer=mixer,
        ema=ema,
        teacher=teacher,
        checkpointer=Checkpointer(run_dir, meta, keep_last=2),  # an older `last` to fall back on
        logger=logger,
        freezer=BackboneFreezer(model, cfg.model.freeze_backbone_epochs, optimizer=optimizer)
        if cfg.model.freeze_backbone_epochs
        else None,
    )
    return Run(cfg, run_dir, model, Loaders(train_loader, val_loader, test_loader), parts, classes)


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


def log_run_summary(cfg, run_dir: Path, device, world: int, sets, log=print) -> None:
    """What the run will do, in a few lines: processes, sizes, model, device, and what has no val / test set."""
    train_set, val_set, test_set = sets
    num_classes = len(train_set.classes)
    if world > 1:
        log(
            f"{world} processes: batch_size {cfg.batch_size} per process, global batch per update "
            f"{cfg.effective_batch_size * world}; BatchNorm "
            + ("synchronised (train.sync_bn)" if cfg.train.sync_bn else "per process (train.sync_bn=false)")
        )
    log(
        f"run {run_dir}: {len(train_set)} train / {_count(val_set)} val / {_count(test_set)} test images, "
        f"{num_classes} classes, model {cfg.model.name}, device {device}, best metric {cfg.eval.best_metric} "
        "(chosen on val, reported on test)"
    )
    if val_set is None:
        log(
            "no validation set (data.val_fraction=0 and no val folder): only `last` is kept, nothing is chosen"
        )
    if test_set is None:
        log("no test set (no test folder / data.test_csv): the run reports validation scores only")


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


def new_run_dir(output_dir: str, name: str) -> Path:
    """``output_dir/name-NNN`` with the next free number (created atomically with mkdir)."""
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name.rsplit("-", 1)[1]) for p in root.glob(f"{name}-[0-9][0-9][0-9]") if p.is_dir()]
    number = max(taken, default=0) + 1
    while True:
        path = root / f"{name}-{number:03d}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            number += 1


def load_model(checkpoint: str | Path, device):
    """(model in eval mode, Checkpoint) from a checkpoint path; the model is rebuilt from the stored config."""
    from trickbag.checkpoint import load_checkpoint
    from trickbag.config import config_from_dict

    ckpt = load_checkpoint(checkpoint, with_state=False)
    cfg = config_from_dict(ckpt.meta["config"], str(ckpt.path / "meta.json"))
    model = build_model_for(cfg, len(ckpt.meta["classes"]), ckpt.meta["image_shape"][0], device)
    if cfg.eval.logit_adjust_tau > 0:
        attach_posthoc_adjustment(model, cfg, ckpt.meta["class_counts"])
    try:
        model.load_state_dict(ckpt.weights)
    except RuntimeError as error:  # e.g. a model default changed since the checkpoint was written
        detail = str(error).strip().splitlines()[-1].strip()
        raise ValueError(
            f"checkpoint {ckpt.path}: its weights do not fit model {cfg.model.name!r} built from its config "
            f"({detail}); was it written by another trickbag version? Set the differing model.options explicitly."
        ) from error
    return model.eval(), ckpt


# ---------------------------------------------------------------------------------------------------------------
# From the config to fit()'s options, and the end of a run: test scores of the kept checkpoints


# What trickbag.train.evaluate returns with ClassificationMetrics (top-k accuracies only when asked for).
SCORE_NAMES = ("loss", "accuracy", "macro_f1", "weighted_f1", "macro_precision", "macro_recall",
               "balanced_accuracy", "auroc")  # fmt: skip


def score_name(config_name: str) -> str:
    """A config's metric name as evaluate() reports it: ``val_loss`` (the config's spelling) is ``loss``."""
    return "loss" if config_name == "val_loss" else config_name


def requested_top_k(cfg, num_classes: int) -> tuple[int, ...]:
    """The k of every ``topK_accuracy`` the config monitors; a name the run cannot compute is a ValueError.

    Checked before training, so a typo or a top-5 on 3 classes fails at once with the names that do work.
    """
    import re

    wanted = {"eval.best_metric": cfg.eval.best_metric}
    if cfg.early_stopping.enabled and cfg.early_stopping.monitor != "best_metric":
        wanted["early_stopping.monitor"] = cfg.early_stopping.monitor
    ks, problems = set(), []
    for key, name in wanted.items():
        match = re.fullmatch(r"top([0-9]+)_accuracy", name)
        if match is None:
            if score_name(name) not in SCORE_NAMES:
                problems.append(f"{key}={name}")
            continue
        k = int(match.group(1))
        if 1 < k < num_classes:
            ks.add(k)
        else:
            problems.append(f"{key}={name} (needs 1 < k < {num_classes} classes)")
    if problems:
        available = ", ".join(["val_loss", *SCORE_NAMES[1:], f"topK_accuracy for 1 < K < {num_classes}"])
        raise ValueError(f"{'; '.join(problems)}: this run cannot compute it; available: {available}")
    return tuple(sorted(ks))


def fit_options(cfg):
    """``trickbag.train.FitOptions`` from a validated config whose ``eval.best_metric`` is resolved."""
    from trickbag.train import EarlyStopping, FitOptions

    if cfg.eval.best_metric == "auto":
        raise ValueError("resolve eval.best_metric first (build_run does it from the training labels)")
    stop = cfg.early_stopping
    early = None
    if stop.enabled:
        monitor = stop.monitor if stop.monitor == "best_metric" else score_name(stop.monitor)
        early = EarlyStopping(
            patience=stop.patience, monitor=monitor, min_delta=stop.min_delta, mode=stop.mode
        )
    plateau_watches = "best_metric" if getattr(cfg.schedule, "mode", "min") == "max" else "loss"
    return FitOptions(
        epochs=cfg.epochs,
        accumulate=cfg.accumulate,
        clip_grad_norm=cfg.train.clip_grad_norm,
        nan_policy=cfg.train.nan_policy,
        log_every=cfg.train.log_every,
        eval_every_epochs=cfg.train.eval_every_epochs,
        flip_tta=cfg.eval.flip_tta,
        translate_tta=cfg.eval.translate_tta,
        best_metric=score_name(cfg.eval.best_metric),
        best_mode=cfg.eval.mode,
        early_stopping=early,
        plateau_watches=plateau_watches if cfg.schedule.kind == "plateau" else "loss",
        distill_alpha=cfg.distill.alpha,
        distill_temperature=cfg.distill.temperature,
    )


RESULTS_FILE = "results.json"


def finish_run(run: Run, state) -> dict[str, Any]:
    """Evaluate each kept checkpoint (best_metric, best_loss, last) once on test; write ``results.json``.

    Val scores come from the epoch rows (they chose the checkpoints); test scores are computed here, once per
    distinct checkpoint, and choose nothing. Returns the results dict (also written to ``run_dir/results.json``).
    """
    import copy
    import json

    from trickbag import distributed
    from trickbag.checkpoint import atomic_write_bytes, load_checkpoint
    from trickbag.train import evaluate

    parts, loaders = run.parts, run.loaders
    current = parts.ema.module if parts.ema is not None else run.model  # what `last` evaluates, as val did
    epochs = {"best_metric": state.best_metric_epoch, "best_loss": state.best_loss_epoch, "last": state.epoch}
    checkpoints: dict[str, Any] = {}
    tested: dict[int, dict[str, float]] = {}  # epoch -> test scores: the same weights are tested once
    per_class: dict[int, list[dict]] = {}  # epoch -> precision/recall/F1 per class on test
    test_seconds: dict[int, float] = {}  # epoch -> seconds its test pass took
    paths = {
        kind: parts.checkpointer.latest(kind) if parts.checkpointer is not None else None for kind in epochs
    }
    paths = distributed.broadcast_object(paths)  # several processes: rank 0's files decide, for every rank
    for kind, epoch in epochs.items():
        path = paths[kind]
        if path is None or epoch == 0:
            continue
        row = state.history[epoch - 1] if 0 < epoch <= len(state.history) else {}
        entry = {"epoch": epoch, "path": str(path),
                 "val": {key[4:]: value for key, value in row.items() if key.startswith("val_")}}  # fmt: skip
        if loaders.test is not None:
            # A best checkpoint of the final epoch holds the weights `last` evaluates: test them once.
            if epoch not in tested:
                model = current
                if epoch != state.epoch:
                    model = copy.deepcopy(current)
                    if distributed.is_main():
                        model.load_state_dict(load_checkpoint(path, with_state=False).weights)
                distributed.broadcast_module_state(model)  # rank 0's weights and buffers, what it saved
                started = time.perf_counter()
                tested[epoch] = evaluate(model, loaders.test, parts.loss_fn, parts.metrics,
                                         precision=parts.precision, flip_tta=run.cfg.eval.flip_tta,
                                         translate_tta=run.cfg.eval.translate_tta)  # fmt: skip
                # The final evaluation is part of a recipe's cost (benchmarks/cifar10_cpu.py adds it).
                test_seconds[epoch] = round(time.perf_counter() - started, 3)
                if hasattr(parts.metrics, "per_class"):
                    per_class[epoch] = parts.metrics.per_class()
            entry["test"] = tested[epoch]
            entry["test_s"] = test_seconds[epoch]
            if epoch in per_class:
                entry["test_per_class"] = per_class[epoch]
        checkpoints[kind] = entry
    results = {
        "status": "finished",
        "stopped_early": state.stopped_early,
        "epochs": state.epoch,
        "best_metric": score_name(run.cfg.eval.best_metric),
        "selection": "val" if loaders.val is not None else "none (no validation set: last only)",
        "train_time_s": round(state.train_time_s, 3),
        "images_per_s": round(state.images / max(state.train_time_s, 1e-9), 1),
        "skipped_updates": state.skipped_updates,
        # precision / channels_last / compile as chosen, with the probe's timings and the CPU or GPU
        "hardware": parts.checkpointer.meta.get("hardware") if parts.checkpointer is not None else None,
        # training label counts: the summary, eval and report mark the rarest classes by them
        "class_counts": None if parts.checkpointer is None else parts.checkpointer.meta.get("class_counts"),
        "checkpoints": checkpoints,
    }
    if distributed.is_main():
        atomic_write_bytes(run.run_dir / RESULTS_FILE, json.dumps(results, indent=2).encode("utf-8"))
    return results


def _count(imageset) -> int:
    return 0 if imageset is None else len(imageset)
