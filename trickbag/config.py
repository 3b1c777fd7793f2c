"""Typed run configuration: one YAML file plus ``key.sub=value`` overrides.

Every section is a pydantic model with ``extra="forbid"``, so a typo is an error instead of a silently ignored
key, and every default lives exactly once, here (the optimizer and schedule sections map onto the plain arguments
of ``trickbag.optim`` / ``trickbag.schedules`` through ``build_optimizer_from_config`` / ``build_scheduler``).
``load_config`` collects *all* problems of a file and reports them
together, each naming the file, the key path and the value, e.g.::

    run.yaml: schedule.kind='cosin' not in {'constant', 'step', 'cosine', 'plateau'}
    run.yaml: unknown key 'optimiser' (did you mean 'optimizer'?)
"""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trickbag.optim import build_optimizer, param_groups, scale_lr
from trickbag.schedules import ScheduleKind, Scheduler, ScheduleSpec

if typing.TYPE_CHECKING:
    import torch
    from torch import nn


class ConfigError(ValueError):
    """One or more problems in a config file; the message lists all of them, one per line."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    kind: Literal["digits", "image_folder", "csv"] = "digits"
    root: str | None = None  # image_folder: train_dir/, val_dir/, test_dir/; csv: paths relative to it
    train_dir: str = "train"
    val_dir: str = "val"  # used for selection when it exists; else a val_fraction split of train
    test_dir: str = "test"  # reported only, never used to choose anything
    # 0.1: 5,000 CIFAR images give a +-0.4-point standard error on accuracy, enough to pick an epoch, for 10% of
    # the training data; 0 keeps all of train and chooses nothing (only `last` is kept).
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    split_seed: int = Field(0, ge=0)  # the val split is the same for every run seed (paired comparisons)
    csv: str | None = None  # csv kind: file with columns path,label
    test_csv: str | None = None  # csv kind: the test set (same columns); none: no test figures
    cache_dir: str | None = None  # the image cache folder itself; None: $TRICKBAG_CACHE_DIR or ~/.cache
    skip_bad_images: bool = False
    crop_padding: int = Field(0, ge=0)  # random crop after reflect padding of this many pixels
    # random horizontal flip; "alternate": each image mirrored every other epoch (airbench; data.flip_mask)
    flip: bool | Literal["alternate"] = False
    # Progressive resizing of in-memory training images: the side per epoch, the last repeating (e.g. [16, 16, 32]:
    # two epochs at 16x16, then full size). Early low-resolution epochs cost ~(side / size)^2; see data.BatchLoader.
    train_sizes: list[int] | None = None
    # auto: channels_last when a short probe of the model measures it faster (trickbag.hardware); resolved in place
    channels_last: bool | Literal["auto"] = "auto"
    num_workers: int | None = Field(None, ge=0)  # decoding processes; None: one per core, 0: in-process
    # Class-balanced sampling of each training epoch (trickbag.longtail.ClassBalancedSampler): "inverse" draws
    # every class equally often, "sqrt" by sqrt(n_c), "repeat_factor" repeats classes rarer than 1/C (LVIS).
    sampling: Literal["none", "inverse", "sqrt", "repeat_factor"] = "none"
    # Images of any size (trickbag.transforms): fitted to image_size x image_size; None keeps the files' own size
    # (all must then be equal). aspect: crop (shorter side, centre crop), squash (both sides) or pad (letterbox).
    image_size: int | None = Field(None, ge=1)
    aspect: Literal["crop", "squash", "pad"] = "crop"
    crop_fraction: float = Field(1.0, gt=0.0, le=1.0)  # eval: fit to image_size / crop_fraction, centre crop
    random_resized_crop: bool = False  # train on random-resized crops of the original files (streamed)
    rrc_scale: tuple[float, float] = (0.08, 1.0)  # fraction of the image area (Szegedy et al. 2015)
    rrc_ratio: tuple[float, float] = (0.75, 4 / 3)  # width / height, drawn log-uniformly
    # true: decode once into memory (the fast path for small images); false: decode per batch in worker
    # processes (trickbag.streaming); auto: in memory unless it would exceed memory_budget_gb, or for RRC.
    in_memory: bool | Literal["auto"] = "auto"
    memory_budget_gb: float | None = Field(None, gt=0.0)  # None: a quarter of this machine's RAM

    @model_validator(mode="after")
    def _check_image_options(self) -> DataConfig:
        from trickbag.transforms import check_range

        check_range("data.rrc_scale", self.rrc_scale, 0.0, 1.0)
        check_range("data.rrc_ratio", self.rrc_ratio, 0.0)
        if self.random_resized_crop and self.image_size is None:
            raise ValueError("data.random_resized_crop needs data.image_size (the side of the crops)")
        if self.random_resized_crop and self.crop_padding:
            raise ValueError("data.random_resized_crop and data.crop_padding are two crops: use one of them")
        if self.train_sizes is not None and (self.random_resized_crop or self.in_memory is False):
            raise ValueError(
                "data.train_sizes resizes in-memory batches: it cannot be combined with data.random_resized_crop "
                "or data.in_memory=false (set the crop size with data.image_size instead)"
            )
        if self.random_resized_crop and self.in_memory is True:
            raise ValueError(
                "data.random_resized_crop crops the original files: use data.in_memory=auto or false"
            )
        return self


class ModelConfig(_Section):
    name: str = "digits_cnn"
    options: dict[str, Any] = Field(
        default_factory=dict
    )  # passed to trickbag.models.build_model, checked there
    zero_init_residual_bn: bool = False
    identity_init: bool = False  # Dirac-init stride-1 convs (trickbag.init.identity_init_convs; plain nets)
    # Fine-tuning: weights from a file (safetensors, a weights-only state dict, or a trickbag checkpoint folder);
    # the classifier head is replaced for the run's classes (trickbag.finetune.load_pretrained). Nothing downloads.
    pretrained: str | None = None
    freeze_backbone_epochs: int = Field(0, ge=0)  # train only the head for this many epochs first


class LossConfig(_Section):
    # ldam, logit_adjusted, balanced_softmax: trickbag.longtail (priors/margins from the training label counts)
    kind: Literal["ce", "focal", "ldam", "logit_adjusted", "balanced_softmax"] = "ce"
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    smoothing_style: str = "uniform"  # checked by trickbag.losses.smooth_labels
    focal_gamma: float = Field(2.0, ge=0.0)
    class_weights: Literal["none", "effective_number", "inverse_frequency"] = "none"
    beta: float = Field(0.999, ge=0.0, lt=1.0)  # effective-number beta (Cui et al. 2019)
    # Deferred re-weighting (Cao et al. 2019): class_weights (or data.sampling) only from this 0-based epoch.
    drw_epoch: int | None = Field(None, ge=0)
    tau: float = Field(1.0, gt=0.0)  # logit_adjusted: temperature of the log-prior offset (Menon et al. 2021)
    ldam_max_margin: float = Field(0.5, gt=0.0)  # ldam: margin of the rarest class (Cao et al. 2019)
    ldam_scale: float = Field(30.0, gt=0.0)  # ldam: s; Cao et al.'s 30 is for cosine logits, see the recipes


class MixingConfig(_Section):
    mixup_alpha: float = Field(0.0, ge=0.0)
    cutmix_alpha: float = Field(0.0, ge=0.0)
    fmix_alpha: float = Field(0.0, ge=0.0)
    prob: float = Field(1.0, ge=0.0, le=1.0)
    mode: str = "batch"  # checked by trickbag.mixing.BatchMixer
    off_epoch: int | None = Field(None, ge=0)  # mixing switched off from this epoch on (0-based)

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and max(self.mixup_alpha, self.cutmix_alpha, self.fmix_alpha) > 0


class TrainConfig(_Section):
    clip_grad_norm: float | None = Field(None, gt=0.0)
    ema_decay: float | None = Field(None, gt=0.0, lt=1.0)  # None: no EMA of weights
    log_every: int = Field(50, ge=1)  # running loss printed every this many optimizer updates
    eval_every_epochs: int = Field(1, ge=1)
    nan_policy: Literal["stop", "skip"] = "stop"
    # Several processes only: BatchNorm statistics over the union of every process's batch. Without it each
    # process normalises with its own batch's statistics and the running statistics are rank 0's.
    sync_bn: bool = False


# Keys of trickbag.metrics.ClassificationMetrics.compute() plus the validation loss; "topK_accuracy" also works.
# The run checks topK against its number of classes before training (trickbag.run.requested_top_k).
METRIC_NAMES = (
    "accuracy", "macro_f1", "weighted_f1", "macro_precision", "macro_recall", "balanced_accuracy", "auroc", "val_loss",
)  # fmt: skip


def _check_metric_name(value: str, extra: tuple[str, ...]) -> str:
    if value in extra or value in METRIC_NAMES or re.fullmatch(r"top[0-9]+_accuracy", value):
        return value
    close = difflib.get_close_matches(value, [*extra, *METRIC_NAMES], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(
        f"not a metric name{hint}; use one of {', '.join([*extra, *METRIC_NAMES])} or topK_accuracy"
    )


class EvalConfig(_Section):
    flip_tta: bool = False  # average with the mirrored images (trickbag.tta)
    # Also the images shifted one pixel up-left and down-right (after airbench's multi-crop; 4 views with flip_tta)
    translate_tta: bool = False
    # Post-hoc logit adjustment (Menon et al. 2021): evaluation and prediction use z - tau * log(prior); 0: off.
    logit_adjust_tau: float = Field(0.0, ge=0.0)
    # "auto": accuracy on balanced data, macro_f1 on imbalanced (trickbag.metrics.advise)
    best_metric: str = "auto"
    mode: Literal["auto", "max", "min"] = "auto"

    @field_validator("best_metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        return _check_metric_name(value, ("auto",))


class EarlyStoppingConfig(_Section):
    enabled: bool = False
    monitor: str = "best_metric"  # "best_metric", "val_loss" or a metric name
    patience: int = Field(5, ge=1)  # evaluations without improvement before stopping
    min_delta: float = Field(0.0, ge=0.0)
    mode: Literal["auto", "max", "min"] = "auto"

    @field_validator("monitor")
    @classmethod
    def _known_monitor(cls, value: str) -> str:
        return _check_metric_name(value, ("best_metric",))


class DistillConfig(_Section):
    teacher: str | None = None  # checkpoint folder of a trained teacher; None: no distillation
    temperature: float = Field(4.0, gt=0.0)
    alpha: float = Field(0.5, ge=0.0, le=1.0)  # weight of the distillation term


class LoggingConfig(_Section):
    tensorboard: bool = False


class OptimizerConfig(_Section):
    """The ``optimizer:`` section; :func:`build_optimizer_from_config` maps it onto ``trickbag.optim``.

    ``lr`` is the learning rate per ``ref_batch_size`` images.
    """

    # muon: Muon for the hidden conv/linear weights, SGD (lr, momentum, nesterov, weight_decay) for the rest
    name: Literal["sgd", "adamw", "adam", "rmsprop", "muon"] = "sgd"
    lr: float = Field(0.1, gt=0.0)  # per ref_batch_size images; scaled to the effective batch when scale_lr
    ref_batch_size: int = Field(256, gt=0)
    scale_lr: bool = True
    weight_decay: float = Field(5e-4, ge=0.0)
    no_decay_bias_norm: bool = True
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0.0)
    implementation: Literal["auto", "fused", "foreach", "for_loop"] = "auto"
    backbone_lr_factor: float = Field(1.0, gt=0.0)  # LR of every parameter but the head's (fine-tuning: < 1)
    # name=muon only (trickbag.muon): the hidden weights' LR per update, not scaled with the batch (Muon's step
    # has a fixed size), their momentum, Newton-Schulz steps, and the rescaling before each step (airbench)
    muon_lr: float = Field(0.06, gt=0.0)
    muon_momentum: float = Field(0.75, ge=0.0, lt=1.0)  # airbench's 0.6 is for batch 2000; 0.75 at 128
    muon_ns_steps: int = Field(5, ge=1, le=20)
    muon_normalize: bool = True

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"betas must both be in [0, 1), got {list(betas)}")
        return betas

    @model_validator(mode="after")
    def _muon_settings_only_with_muon(self) -> OptimizerConfig:
        if self.name == "muon" and self.backbone_lr_factor != 1.0:
            raise ValueError(
                "backbone_lr_factor is not supported with name='muon' (its hidden weights have muon_lr)"
            )
        if self.name == "muon" and self.implementation != "auto":
            raise ValueError(
                f"implementation={self.implementation!r} is not available with name='muon' (its SGD groups take "
                "torch's fused kernel where there is one); use auto"
            )
        return self


class ScheduleConfig(_Section):
    """The ``schedule:`` section: the keyword arguments of ``trickbag.schedules.Scheduler``, same names and
    defaults (:func:`build_scheduler`). Durations are in epochs, or in optimizer updates for ``*_steps``."""

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
    def _check_with_the_scheduler_rules(self) -> ScheduleConfig:
        # The rules between fields (kind, durations, interval) live once, in trickbag.schedules; its
        # ValueError lists every problem. A field at its default counts as not given, so dumps round-trip.
        ScheduleSpec(**self.model_dump())
        return self


def build_optimizer_from_config(
    model: nn.Module,
    cfg: OptimizerConfig,
    effective_batch_size: int,
    *,
    ns_dtype: torch.dtype | None = None,
) -> torch.optim.Optimizer:
    """The optimizer of the ``optimizer:`` section for ``model``, with no-decay groups for biases and norms.

    ``cfg.lr`` is scaled to ``effective_batch_size`` (micro-batch x accumulation steps x world size) when
    ``cfg.scale_lr``. ``ns_dtype``: the precision of Muon's Newton-Schulz steps (name=muon only; None: float32;
    the trainer passes bfloat16 where its probe chose bf16, i.e. where bf16 matmuls are fast).
    """
    if not isinstance(cfg, OptimizerConfig):
        raise TypeError(f"cfg must be an OptimizerConfig, got {type(cfg).__name__}")
    batch = effective_batch_size
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"effective_batch_size must be an int > 0, got {batch!r}")
    lr = scale_lr(cfg.lr, batch, base_batch_size=cfg.ref_batch_size) if cfg.scale_lr else cfg.lr
    if cfg.name == "muon":
        import torch

        from trickbag.muon import Muon, muon_param_groups

        groups = muon_param_groups(
            model, lr=lr, weight_decay=cfg.weight_decay, no_decay_bias_norm=cfg.no_decay_bias_norm
        )
        return Muon(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
                    muon_lr=cfg.muon_lr, muon_momentum=cfg.muon_momentum, ns_steps=cfg.muon_ns_steps,
                    ns_dtype=ns_dtype or torch.float32, normalize=cfg.muon_normalize)  # fmt: skip
    return build_optimizer(
        cfg.name,
        param_groups(
            model,
            cfg.weight_decay,
            no_decay_bias_norm=cfg.no_decay_bias_norm,
            backbone_lr_factor=cfg.backbone_lr_factor,
        ),
        lr=lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        betas=cfg.betas,
        eps=cfg.eps,
        implementation=cfg.implementation,
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, *, steps_per_epoch: int, epochs: int
) -> Scheduler:
    """The Scheduler of the ``schedule:`` section (its fields are the Scheduler's keyword arguments)."""
    if not isinstance(cfg, ScheduleConfig):
        raise TypeError(f"cfg must be a ScheduleConfig, got {type(cfg).__name__}")
    return Scheduler(optimizer, **cfg.model_dump(), steps_per_epoch=steps_per_epoch, epochs=epochs)


class Config(_Section):
    name: str = "run"
    seed: int = Field(0, ge=0)
    device: str = "auto"  # "auto" -> cuda if available else cpu
    epochs: int = Field(10, ge=1)
    # Per micro-batch and per process: with torchrun's N processes an update sees batch_size x accumulate x N
    # images, and the linear LR scaling rule uses that global effective batch.
    batch_size: int = Field(128, ge=1)
    accumulate: int = Field(1, ge=1)  # micro-batches per optimizer update
    output_dir: str = "runs"
    deterministic: bool = False
    threads: int | None = Field(None, ge=1)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    mixing: MixingConfig = Field(default_factory=MixingConfig)
    # auto: CUDA bf16 where the card has it, else fp16; CPU bf16 only where a probe of the model measures it
    # faster than fp32 (emulated bf16 on AVX2-only CPUs is ~70x slower). Resolved in place (trickbag.hardware).
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    # torch.compile: auto compiles when the run is long enough to pay back the compile time (trickbag.compile)
    compile: Literal["off", "on", "auto"] = "auto"
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_words(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare on/off as true/false: take them as the words they were written as.
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @property
    def effective_batch_size(self) -> int:
        return self.batch_size * self.accumulate


# ---------------------------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply ``key.sub=value`` overrides and validate everything at once.

    Args:
        path: YAML file, or None for the defaults.
        overrides: strings ``key.sub=value``; the value is parsed as a YAML scalar (``lr=0.1`` is a float,
            ``ema_decay=null`` is None, ``name=abc`` a string).
    Raises:
        FileNotFoundError: the file does not exist.
        ConfigError: bad YAML (with file and line), or every validation problem, one per line.
    """
    source = str(path) if path is not None else "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        raw = parse_yaml(path.read_text(encoding="utf-8"), source)
    problems: list[str] = []
    for override in overrides:
        try:
            apply_override(raw, override)
        except ValueError as error:
            problems.append(f"{source}: {error}")
    return config_from_dict(raw, source, problems)


def parse_yaml(text: str, source: str) -> dict[str, Any]:
    """safe_load ``text``; syntax errors name the file and the line."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(f"{source}{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set ``key.sub=value`` in the nested dict ``raw`` (value parsed as a YAML scalar)."""
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {override!r} is not of the form key.sub=value")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text  # a plain string such as "a:b" that YAML cannot read as a scalar
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"override {override!r}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def config_from_dict(
    raw: dict[str, Any], source: str = "<dict>", problems: list[str] | None = None
) -> Config:
    """Validate a nested dict; all problems (plus ``problems`` found earlier) raised together as ConfigError."""
    problems = list(problems or [])
    config = None
    try:
        config = Config.model_validate(raw)
    except ValidationError as error:
        problems.extend(f"{source}: {describe_error(item)}" for item in merge_union_errors(error.errors()))
    if config is not None:
        problems.extend(f"{source}: {problem}" for problem in imbalance_problems(config))
    if problems:
        raise ConfigError("\n".join(problems))
    return config


def imbalance_problems(config: Config) -> list[str]:
    """Combinations of the long-tail options that would correct the same imbalance twice, or do nothing."""
    loss, data, problems = config.loss, config.data, []
    adjusted = loss.kind in ("logit_adjusted", "balanced_softmax")
    if adjusted and loss.class_weights != "none":
        problems.append(
            f"loss.kind={loss.kind!r} with loss.class_weights={loss.class_weights!r}: the label prior already "
            "re-balances the loss; set loss.class_weights=none (or use kind=ldam with drw_epoch)"
        )
    if adjusted and data.sampling != "none":
        problems.append(
            f"loss.kind={loss.kind!r} with data.sampling={data.sampling!r}: the prior offset assumes the natural "
            "label distribution; balanced sampling would correct twice. Set data.sampling=none"
        )
    if data.sampling != "none" and (data.random_resized_crop or data.in_memory is False):
        problems.append(
            f"data.sampling={data.sampling!r} needs the in-memory loader; streamed images (data.in_memory=false "
            "or data.random_resized_crop) are not sampled by class: use data.sampling=none with "
            "loss.class_weights (and loss.drw_epoch) instead"
        )
    if data.sampling != "none" and loss.class_weights != "none":
        problems.append(
            f"data.sampling={data.sampling!r} with loss.class_weights={loss.class_weights!r} re-balances twice; "
            "keep one of them"
        )
    # A changed focal_gamma is the only sign of "focal" intent here (a stored config writes the default out).
    gamma_default = LossConfig.model_fields["focal_gamma"].default
    if loss.kind in ("ldam", "logit_adjusted", "balanced_softmax") and loss.focal_gamma != gamma_default:
        problems.append(
            f"loss.focal_gamma={loss.focal_gamma} with loss.kind={loss.kind!r}: focal loss does not combine "
            f"with it here; remove loss.focal_gamma (or use kind=focal)"
        )
    if loss.drw_epoch is not None:
        if loss.class_weights == "none" and data.sampling == "none":
            problems.append(
                f"loss.drw_epoch={loss.drw_epoch} defers nothing: set loss.class_weights (e.g. effective_number) "
                "or data.sampling"
            )
        if loss.drw_epoch >= config.epochs:
            problems.append(
                f"loss.drw_epoch={loss.drw_epoch} is never reached with epochs={config.epochs}; "
                f"use a 0-based epoch < {config.epochs}"
            )
    if config.eval.logit_adjust_tau > 0 and (
        adjusted or loss.class_weights != "none" or data.sampling != "none"
    ):
        problems.append(
            f"eval.logit_adjust_tau={config.eval.logit_adjust_tau} corrects a model trained on the natural label "
            "distribution; this run already re-balances (loss.kind/class_weights/data.sampling). Set it to 0"
        )
    return problems


def _expected(item: dict[str, Any]) -> str:
    """What one branch of a union (``bool | Literal["auto"]``) accepts, in a few words."""
    kind = item["type"]
    if kind.startswith("bool"):
        return "true or false"
    if kind == "literal_error":
        return str(item.get("ctx", {}).get("expected", item["msg"]))
    if kind.startswith("int"):
        return "an integer"
    if kind.startswith("float"):
        return "a number"
    return item["msg"]


def merge_union_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One error per key: pydantic reports a value no branch of a union accepts once per branch, under
    ``key.<branch>`` (``data.flip.bool``, ``data.flip.literal['alternate']``); these become one error at ``key``
    that lists what each branch accepts."""
    merged: list[dict[str, Any]] = []
    for item in errors:
        location = [str(part) for part in item["loc"]]
        is_branch = (
            len(location) > 1
            and location[-1] not in _fields_at(location[:-1])
            and (location[-1] in ("bool", "int", "float", "str") or location[-1].startswith("literal["))
        )
        if not is_branch:
            merged.append(item)
            continue
        key = tuple(item["loc"][:-1])
        if merged and merged[-1].get("type") == "union" and tuple(merged[-1]["loc"]) == key:
            merged[-1]["msg"] += f", or {_expected(item)}"
        else:
            merged.append({"loc": key, "type": "union", "input": item.get("input"),
                           "msg": f"expected {_expected(item)}"})  # fmt: skip
    return merged


def describe_error(item: dict[str, Any]) -> str:
    """One pydantic error as ``key.path=value problem`` or ``unknown key 'x' (did you mean 'y'?)``."""
    location = [str(part) for part in item["loc"]]
    key = ".".join(location)
    kind = item["type"]
    value = item.get("input")
    if kind == "extra_forbidden":
        parent, name = location[:-1], location[-1]
        known = sorted(_fields_at(parent))
        where = f" in section '{'.'.join(parent)}'" if parent else ""
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f"; valid keys: {', '.join(known)}"
        return f"unknown key '{key}'{where}{hint}" if parent else f"unknown key '{name}'{hint}"
    if kind == "literal_error":
        allowed = _literal_choices(location)
        if allowed:
            return f"{key}={value!r} not in {{{', '.join(repr(choice) for choice in allowed)}}}"
    if kind == "missing":
        return f"{key}: required key is missing"
    message = item["msg"].removeprefix("Value error, ")  # pydantic's wording around our own validators
    if isinstance(value, dict):  # a whole-section check: its message names the keys; the dump would not
        return f"{key}: {message}" if key else message
    return f"{key}={value!r}: {message}"


def _model_at(location: list[str]) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in location:
        field = model.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _fields_at(location: list[str]) -> list[str]:
    model = _model_at(location)
    return list(model.model_fields) if model is not None else []


def _literal_choices(location: list[str]) -> tuple[Any, ...]:
    model = _model_at(location[:-1])
    if model is None or location[-1] not in model.model_fields:
        return ()
    annotation = model.model_fields[location[-1]].annotation
    for candidate in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(candidate) is Literal:
            return typing.get_args(candidate)
    return ()


def config_to_dict(config: Config) -> dict[str, Any]:
    """The resolved config as plain data (every default written out), valid input of ``config_from_dict``."""
    return config.model_dump(mode="json")


def config_to_yaml(config: Config) -> str:
    """The resolved config as YAML, loadable again with ``load_config``."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)
