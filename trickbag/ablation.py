"""Ablation files: which tricks to compare, on which seeds, in which design; expanded into arms to run.

An ablation file (YAML) names a base run, the tricks (arms: each a named list of ``key.sub=value`` overrides),
the seeds and a design::

    name: digits_demo
    base: {recipe: digits, overrides: [epochs=4]}
    arms:
      label_smoothing: [loss.label_smoothing=0.1]
      mixup: {mixing.mixup_alpha: 0.2}
    seeds: 3                 # or a list: [0, 1, 2]
    design: one_at_a_time    # | leave_one_out | cumulative
    metric: auto             # the run's best_metric (accuracy on balanced labels, macro_f1 on imbalanced)

``expand(ablation)`` turns the design into the arms actually run, each with its full override list, the trick
it measures, and the arm it is compared with (every arm runs the *same* seeds: a paired design):

- one_at_a_time: ``base``, then ``+trick`` = base + that trick alone, each compared with ``base``
  (He et al. 2019, "Bag of Tricks", Table 4 style);
- leave_one_out: ``all`` = base + every trick, then ``-trick`` = all but that one, each compared with ``all``;
- cumulative: ``base``, ``+A``, ``+A+B``, ... each adding one trick and compared with the row before it
  (Table 6 / airbench ablation style).

Validation errors name the file, the key and the value, all at once, like ``trickbag.config``.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trickbag.config import ConfigError, describe_error, parse_yaml

DESIGNS = ("one_at_a_time", "leave_one_out", "cumulative")


def _override_list(value: Any) -> Any:
    """``[k=v, ...]`` stays; ``{k: v}`` becomes ``["k=v"]`` with v written as JSON (a valid YAML scalar)."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [f"{key}={json.dumps(item)}" for key, item in value.items()]
    return value


def _check_overrides(overrides: list[str]) -> list[str]:
    for override in overrides:
        key, sep, _ = override.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {override!r} is not of the form key.sub=value")
    return overrides


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Base(_Model):
    recipe: str  # a recipe name (digits, cifar10_fast, ...) or a path to a YAML run config
    overrides: list[str] = Field(default_factory=list)

    @field_validator("overrides", mode="before")
    @classmethod
    def _as_list(cls, value: Any) -> Any:
        return _override_list(value)

    @field_validator("overrides")
    @classmethod
    def _well_formed(cls, value: list[str]) -> list[str]:
        return _check_overrides(value)


class Ablation(_Model):
    name: str | None = None  # default: the file's stem
    base: Base
    arms: dict[str, list[str]] = Field(min_length=1)  # trick name -> overrides
    seeds: list[int] | int = 3  # a count n means seeds 0..n-1
    design: Literal["one_at_a_time", "leave_one_out", "cumulative"] = "one_at_a_time"
    metric: str = "auto"  # "auto": each run's best_metric (the advice's choice); else a metric name
    reference: str | None = None  # arm every other arm is compared with; default per design (see module doc)
    epochs: int | None = Field(None, ge=1)  # overrides the recipe's epochs for every run
    smallest_effect: float = Field(0.005, gt=0)  # effect of interest for the "seeds needed" line
    alpha: float = Field(0.05, gt=0, lt=1)  # family-wise error level (Holm across arms)

    @field_validator("arms", mode="before")
    @classmethod
    def _arm_overrides(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {name: _override_list(item) for name, item in value.items()}
        return value

    @field_validator("arms")
    @classmethod
    def _arm_names(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, overrides in value.items():
            if (
                not name
                or any(char in name for char in "/\\ +")
                or name in ("base", "all")
                or name[0] in "-."
            ):
                raise ValueError(
                    f"arm name {name!r}: use letters, digits, '_' or '-' (not starting with '-'), not 'base'/'all'"
                )
            _check_overrides(overrides)
        return value

    @field_validator("seeds")
    @classmethod
    def _seed_list(cls, value: list[int] | int) -> list[int] | int:
        if isinstance(value, int):
            if value < 1:
                raise ValueError("a seed count must be >= 1")
        elif not value or len(set(value)) != len(value) or min(value) < 0:
            raise ValueError("seeds must be a non-empty list of distinct integers >= 0")
        return value

    @model_validator(mode="after")
    def _known_reference(self) -> Ablation:
        if self.reference is not None:
            names = [arm.name for arm in expand(self)]
            if self.reference not in names:
                raise ValueError(f"reference={self.reference!r} is not an arm of this design; arms: {names}")
        return self

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)


@dataclass(frozen=True)
class Arm:
    """One arm to run: its overrides (on top of the base recipe), the trick it measures and its comparison.

    ``sign`` is +1 when the arm *adds* ``trick`` relative to ``reference`` and -1 when it removes it
    (leave_one_out), so sign · (arm - reference) is the effect of the trick. The reference arm has trick None.
    """

    name: str
    overrides: tuple[str, ...]
    trick: str | None
    reference: str | None
    sign: int = 1


def expand(ablation: Ablation) -> list[Arm]:
    """The arms the design runs, in table order (see the module docstring)."""
    base = list(ablation.base.overrides) + ([f"epochs={ablation.epochs}"] if ablation.epochs else [])
    tricks = list(ablation.arms)
    if ablation.design == "one_at_a_time":
        arms = [Arm("base", tuple(base), None, None)]
        arms += [Arm(f"+{t}", tuple(base + ablation.arms[t]), t, "base") for t in tricks]
    elif ablation.design == "leave_one_out":
        every = [item for t in tricks for item in ablation.arms[t]]
        arms = [Arm("all", tuple(base + every), None, None)]
        for t in tricks:
            rest = [item for other in tricks if other != t for item in ablation.arms[other]]
            arms.append(Arm(f"-{t}", tuple(base + rest), t, "all", sign=-1))
    else:
        arms, stacked, previous = [Arm("base", tuple(base), None, None)], [], "base"
        for t in tricks:
            stacked += ablation.arms[t]
            name = f"{previous}+{t}" if previous != "base" else f"+{t}"
            arms.append(Arm(name, tuple(base + stacked), t, previous))
            previous = name
    if ablation.reference is not None:  # one fixed reference instead of the design's own
        arms = [
            Arm(a.name, a.overrides, None if a.name == ablation.reference else a.trick,
                None if a.name == ablation.reference else ablation.reference, a.sign)
            for a in arms
        ]  # fmt: skip
    return arms


def arm_folder(name: str) -> str:
    """A folder name for an arm: ``+a`` -> ``plus_a``, ``+a+b`` -> ``plus_a_plus_b``, ``-a`` -> ``minus_a``."""
    if name.startswith("-"):
        return "minus_" + name[1:]
    parts = name.split("+")
    return "_plus_".join(part for part in parts if part) if parts[0] else "plus_" + "_plus_".join(parts[1:])


# ---------------------------------------------------------------------------------------------------------------
# Loading


def load_ablation(path: str | Path) -> Ablation:
    """Read and validate an ablation file; every problem is reported together as ``file: key=value problem``.

    Raises:
        FileNotFoundError: no such file.
        ConfigError: bad YAML or invalid content.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ablation file not found: {path}")
    raw = parse_yaml(path.read_text(encoding="utf-8"), str(path))
    raw.setdefault("name", path.stem)
    return ablation_from_dict(raw, str(path))


def ablation_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Ablation:
    try:
        return Ablation.model_validate(raw)
    except ValidationError as error:
        raise ConfigError("\n".join(f"{source}: {_describe(item)}" for item in error.errors())) from None


def _describe(item: dict[str, Any]) -> str:
    """Like ``trickbag.config.describe_error`` but with this file's keys for unknown-key and choice errors."""
    location = [str(part) for part in item["loc"]]
    if item["type"] == "extra_forbidden":
        model = Base if location[:1] == ["base"] else Ablation
        known = sorted(model.model_fields)
        close = difflib.get_close_matches(location[-1], known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f"; valid keys: {', '.join(known)}"
        return f"unknown key '{'.'.join(location)}'{hint}"
    if item["type"] == "literal_error" and location == ["design"]:
        return f"design={item.get('input')!r} not in {{{', '.join(repr(d) for d in DESIGNS)}}}"
    if not location:  # a check across keys (the model validator) already names its key
        return item["msg"].removeprefix("Value error, ")
    if item["type"] == "missing":
        return f"{'.'.join(location)}: required key is missing"
    return describe_error(item)


def resolve_recipe(name_or_path: str, relative_to: Path | None = None) -> Path:
    """A recipe file: an existing path (as given, or next to the ablation file) or a packaged recipe name.

    Raises:
        ValueError: neither a file nor a known recipe name (the message lists the names).
    """
    candidates = [Path(name_or_path)]
    if relative_to is not None and not Path(name_or_path).is_absolute():
        candidates.append(relative_to / name_or_path)
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    package = Path(__file__).resolve().parent
    folders = [package / "recipes", package.parent / "recipes"]
    stem = name_or_path.removesuffix(".yaml")
    for folder in folders:
        if (folder / f"{stem}.yaml").is_file():
            return (folder / f"{stem}.yaml").resolve()
    names = sorted({p.stem for folder in folders if folder.is_dir() for p in folder.glob("*.yaml")})
    raise ValueError(
        f"recipe {name_or_path!r} is neither a file nor a recipe name; recipes: {', '.join(names)}"
    )


def resolve_ablation_file(name_or_path: str) -> Path:
    """An ablation file: an existing path or a shipped one by name (``digits_demo``)."""
    if Path(name_or_path).is_file():
        return Path(name_or_path)
    shipped = Path(__file__).resolve().parent / "ablations" / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in shipped.parent.glob("*.yaml"))
    raise FileNotFoundError(
        f"ablation file not found: {name_or_path} (shipped ablations: {', '.join(names)})"
    )
