"""Wiring from a validated config to the trainer's parts: data, model, loss, optimizer, schedule, checkpoints.

``build_run(cfg, run_dir)`` returns everything ``trickbag.train.fit`` needs, so a Python user can reuse the
wiring of ``trickbag train`` and still call ``fit`` (or their own loop) themselves. The single parts it composes
(model, hardware choice, training loader, loss, ...) are small functions in ``trickbag.parts``. Heavy imports happen inside
the functions: ``trickbag --help`` imports this module.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trickbag.parts import (
    apply_runtime_settings,
    attach_posthoc_adjustment,
    build_model_for,
    choose_hardware_settings,
    compile_for_run,
    input_statistics,
    loss_from_config,
    mixer_from_config,
    teacher_for,
    train_loader_for,
)


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
    ns_dtype = torch.bfloat16 if hardware["precision"] == "bf16" else torch.float32  # Muon's matmuls
    optimizer = build_optimizer_from_config(
        model, cfg.optimizer, cfg.effective_batch_size * world, ns_dtype=ns_dtype
    )
    if cfg.optimizer.name == "muon":
        from trickbag.muon import hidden_weight_names

        hidden = hidden_weight_names(model)
        logger.info(
            f"optimizer muon: Muon (muon_lr {cfg.optimizer.muon_lr:g}, momentum {cfg.optimizer.muon_momentum:g}, "
            f"{cfg.optimizer.muon_ns_steps} Newton-Schulz steps in {str(ns_dtype).removeprefix('torch.')}) on "
            f"{len(hidden)} hidden weights ({', '.join(hidden[:3])}{', ...' if len(hidden) > 3 else ''}); "
            "SGD on the input layer, the head, biases and norms"
        )
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
