from __future__ import annotations

from pathlib import Path

import pytest

from trickbag.config import (
    Config,
    ConfigError,
    apply_override,
    config_from_dict,
    config_to_yaml,
    load_config,
)


def write(tmp_path, text: str, name: str = "run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_and_each_default_once():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.data.kind == "digits" and cfg.accumulate == 1 and cfg.eval.best_metric == "auto"
    assert cfg.effective_batch_size == cfg.batch_size


def test_yaml_and_overrides_parse_as_yaml_scalars(tmp_path):
    path = write(tmp_path, "epochs: 3\noptimizer:\n  lr: 0.2\ntrain:\n  ema_decay: 0.99\n")
    cfg = load_config(
        path,
        [
            "optimizer.lr=0.05",
            "train.ema_decay=null",
            "name=abc",
            "model.options={width: 8}",
            "data.flip=true",
        ],
    )
    assert cfg.epochs == 3
    assert cfg.optimizer.lr == 0.05
    assert cfg.train.ema_decay is None
    assert cfg.name == "abc"
    assert cfg.model.options == {"width": 8}
    assert cfg.data.flip is True
    assert load_config(path, ["data.flip=alternate"]).data.flip == "alternate"
    with pytest.raises(ConfigError) as info:
        load_config(path, ["data.flip=sometimes", "data.channels_last=3"])
    # One line per key, not one per branch of the union (pydantic's data.flip.bool, data.flip.literal[...]).
    assert str(info.value).splitlines() == [
        f"{path}: data.flip='sometimes': expected true or false, or 'alternate'",
        f"{path}: data.channels_last=3: expected true or false, or 'auto'",
    ]


def test_unknown_keys_suggest_nearest(tmp_path):
    path = write(tmp_path, "optimiser:\n  lr: 0.1\noptimizer:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert f"{path}: unknown key 'optimiser' (did you mean 'optimizer'?)" in message
    assert "unknown key 'optimizer.lrr' in section 'optimizer' (did you mean 'lr'?)" in message


def test_literal_error_lists_choices(tmp_path):
    path = write(tmp_path, "schedule:\n  kind: cosin\nprecision: fp8\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    lines = str(info.value).splitlines()
    assert len(lines) == 2  # all problems together
    assert any(
        line.startswith(f"{path}: schedule.kind='cosin' not in {{") and "'cosine'" in line for line in lines
    )
    assert any("precision='fp8' not in {'auto', 'fp32', 'fp16', 'bf16'}" in line for line in lines)


def test_range_and_type_errors_name_key_and_value(tmp_path):
    path = write(tmp_path, "epochs: 0\nbatch_size: many\ndata:\n  val_fraction: 1.5\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["loss.kind=hinge"])
    message = str(info.value)
    assert "epochs=0" in message
    assert "batch_size='many'" in message
    assert "data.val_fraction=1.5" in message
    assert "loss.kind='hinge' not in {'ce', 'focal', 'ldam', 'logit_adjusted', 'balanced_softmax'}" in message
    assert len(message.splitlines()) == 4


def test_bad_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "epochs: 3\noptimizer:\n  lr: [0.1\nseed: 1\n")
    with pytest.raises(ConfigError, match=r"run\.yaml:\d+:\d+: invalid YAML"):
        load_config(path)


def test_top_level_must_be_mapping(tmp_path):
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_empty_file_is_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == Config()


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="config file not found: nope.yaml"):
        load_config("nope.yaml")


def test_bad_overrides(tmp_path):
    with pytest.raises(ConfigError, match="override 'epochs' is not of the form key.sub=value"):
        load_config(None, ["epochs"])
    with pytest.raises(ConfigError, match="'epochs' is a value, not a section"):
        load_config(None, ["epochs=3", "epochs.x=1"])
    raw: dict = {}
    apply_override(raw, "a.b.c=1")
    assert raw == {"a": {"b": {"c": 1}}}


def test_round_trip_resolved_yaml(tmp_path):
    cfg = load_config(
        None, ["schedule.kind=step", "schedule.step_size=2", "train.clip_grad_norm=1.0", "epochs=4"]
    )
    again = load_config(write(tmp_path, config_to_yaml(cfg), "config.yaml"))
    assert again == cfg


def test_config_from_dict_source_in_message():
    with pytest.raises(ConfigError, match=r"^meta.json: unknown key 'bogus'"):
        config_from_dict({"bogus": 1}, "meta.json")


@pytest.mark.parametrize("recipe", ["recipes/digits.yaml", "recipes/imbalanced_folder.yaml"])
def test_shipped_recipes_validate(recipe):
    cfg = load_config(Path(__file__).resolve().parents[1] / recipe)
    assert cfg.epochs >= 1


def test_metric_names_are_checked():
    assert load_config(None, ["eval.best_metric=top5_accuracy", "early_stopping.monitor=val_loss"])
    with pytest.raises(
        ConfigError, match=r"eval.best_metric='macro_f': not a metric name \(did you mean 'macro_f1'\?\)"
    ):
        load_config(None, ["eval.best_metric=macro_f"])
    with pytest.raises(ConfigError, match=r"early_stopping.monitor='loss'"):
        load_config(None, ["early_stopping.monitor=loss"])
