"""Wiring from a validated config to the trainer's parts: data, model, loss, optimizer, schedule, checkpoints.

``build_run(cfg, run_dir)`` returns everything ``trickbag.train.fit`` needs, so a Python user can reuse the
wiring of ``trickbag train`` and still call ``fit`` (or their own loop) themselves. Heavy imports happen inside
the functions: ``trickbag --help`` imports this module.
"""

from __future__ import annotations

import math
import os
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
    """(train, eval) ImageSets of the config's data section; skipped bad images are reported through ``log``."""
    from trickbag import data

    section = cfg.data
    test = None
    options = {
        "cache_dir": section.cache_dir,
        "skip_bad_images": section.skip_bad_images,
        "num_workers": section.num_workers,
    }
    if section.kind == "digits":
        train, test = data.load_digits()
    elif section.kind == "image_folder":
        if section.root is None:
            raise ValueError("data.root is required for data.kind=image_folder")
        root = Path(section.root)
        train = data.load_image_folder(root / section.train_dir, **options)
        if section.val_fraction == 0 and (root / section.test_dir).is_dir():
            test = align_classes(data.load_image_folder(root / section.test_dir, **options), train.classes)
    else:
        if section.csv is None:
            raise ValueError("data.csv is required for data.kind=csv")
        train = data.load_csv(section.csv, root=section.root, **options)
    for imageset in (train, test):
        if imageset is not None and imageset.skipped:
            log(
                f"skipped {len(imageset.skipped)} unreadable images (data.skip_bad_images): {imageset.skipped}"
            )
    if section.val_fraction > 0:
        return data.split_validation(train, section.val_fraction, cfg.seed)
    if test is None:
        raise ValueError(f"data.kind={section.kind} has no test set here: set data.val_fraction (e.g. 0.1)")
    return train, test


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

    from trickbag.models import build_model

    model = build_model(cfg.model.name, num_classes, in_channels=in_channels, **cfg.model.options)
    if cfg.model.zero_init_residual_bn:
        from trickbag.init import zero_init_residual_bn

        zero_init_residual_bn(model)
    model = model.to(device)
    if cfg.data.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def build_run(cfg, run_dir: Path, *, quiet: bool = False) -> Run:
    """Data, model and trainer parts for ``cfg``; resolves ``eval.best_metric: auto`` from the training labels."""
    import torch

    from trickbag import data
    from trickbag.checkpoint import Checkpointer
    from trickbag.config import config_to_dict, config_to_yaml
    from trickbag.losses import class_weights
    from trickbag.metrics import ClassificationMetrics
    from trickbag.metrics.advice import advise
    from trickbag.optim import optimizer_from_config
    from trickbag.precision import Precision
    from trickbag.report import RunLogger
    from trickbag.schedules import scheduler_from_config
    from trickbag.train import Loaders, Parts

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        # cuBLAS needs a fixed workspace for deterministic matmuls; it must be set before CUDA starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    logger = RunLogger(run_dir, tensorboard=cfg.logging.tensorboard, quiet=quiet)
    device = resolve_device(cfg.device)
    train_set, val_set = load_datasets(cfg, logger.info)
    classes, num_classes = list(train_set.classes), len(train_set.classes)
    counts = torch.bincount(train_set.labels, minlength=num_classes)
    advice = advise(train_set.labels, class_names=classes)
    if cfg.eval.best_metric == "auto":
        cfg.eval.best_metric = advice.best_metric
    if advice.recommend_class_weights and cfg.loss.class_weights == "none":
        logger.info(
            f"class imbalance {advice.imbalance_ratio:.1f}:1 - consider loss.class_weights=effective_number"
        )
    mean, std = data.channel_stats(train_set.images)
    torch.manual_seed(cfg.seed)  # model initialisation and dropout draw from torch's global generator
    model = build_model_for(cfg, num_classes, train_set.images.shape[1], device)
    common = {"device": device, "mean": mean, "std": std, "channels_last": cfg.data.channels_last}
    train_loader = data.BatchLoader(
        train_set.images,
        train_set.labels,
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=len(train_set) >= cfg.batch_size,
        seed=cfg.seed,
        crop_padding=cfg.data.crop_padding,
        flip=cfg.data.flip,
        **common,
    )
    val_loader = data.BatchLoader.for_eval(
        val_set.images, val_set.labels, batch_size=max(cfg.batch_size, 256), **common
    )
    optimizer = optimizer_from_config(model, cfg.optimizer, cfg.effective_batch_size)
    updates_per_epoch = math.ceil(len(train_loader) / cfg.accumulate)
    scheduler = scheduler_from_config(
        optimizer, cfg.schedule, steps_per_epoch=updates_per_epoch, epochs=cfg.epochs
    )
    weight = None
    if cfg.loss.class_weights != "none":
        weight = class_weights(counts, method=cfg.loss.class_weights, beta=cfg.loss.beta)
    loss_fn = loss_from_config(cfg, num_classes, weight)
    mixer = None
    if cfg.mixing.enabled:
        from trickbag.mixing import BatchMixer

        m = cfg.mixing
        mixer = BatchMixer(
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
    ema = None
    if cfg.train.ema_decay is not None:
        from trickbag.ema import ModelEMA

        ema = ModelEMA(model, cfg.train.ema_decay)
    teacher = load_model(cfg.distill.teacher, device)[0].eval() if cfg.distill.teacher else None
    meta = {
        "config": config_to_dict(cfg),
        "classes": classes,
        "image_shape": list(train_set.images.shape[1:]),
        "mean": mean,
        "std": std,
        "class_weights": weight.tolist() if weight is not None else None,  # so `eval` computes the same loss
        "updates_per_epoch": updates_per_epoch,  # with base_lr: `trickbag report` redraws the LR per update
        "base_lr": float(optimizer.param_groups[0]["initial_lr"]),
    }
    (run_dir / "config.yaml").write_text(config_to_yaml(cfg), encoding="utf-8")
    logger.info(
        f"run {run_dir}: {len(train_set)} train / {len(val_set)} eval images, {num_classes} classes, "
        f"model {cfg.model.name}, device {device}, best metric {cfg.eval.best_metric}"
    )
    parts = Parts(
        loss_fn=loss_fn,
        optimizer=optimizer,
        scheduler=scheduler,
        precision=Precision(cfg.precision, device),
        metrics=ClassificationMetrics(num_classes, class_names=classes, zero_division=0.0),
        mixer=mixer,
        ema=ema,
        teacher=teacher,
        checkpointer=Checkpointer(run_dir, meta),
        logger=logger,
    )
    return Run(cfg, run_dir, model, Loaders(train_loader, val_loader), parts, classes)


def loss_from_config(cfg, num_classes: int, weight=None):
    """The run's loss function (class ``weight`` (C,) or None) from its ``loss`` section."""
    import torch

    from trickbag.train import make_loss

    return make_loss(
        cfg.loss.kind,
        num_classes=num_classes,
        label_smoothing=cfg.loss.label_smoothing,
        smoothing_style=cfg.loss.smoothing_style,
        focal_gamma=cfg.loss.focal_gamma,
        weight=None if weight is None else torch.as_tensor(weight, dtype=torch.float32),
    )


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
    try:
        model.load_state_dict(ckpt.weights)
    except RuntimeError as error:  # e.g. a model default changed since the checkpoint was written
        detail = str(error).strip().splitlines()[-1].strip()
        raise ValueError(
            f"checkpoint {ckpt.path}: its weights do not fit model {cfg.model.name!r} built from its config "
            f"({detail}); was it written by another trickbag version? Set the differing model.options explicitly."
        ) from error
    return model.eval(), ckpt
