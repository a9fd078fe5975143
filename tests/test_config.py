"""Gretel-shaped training configs: both layouts parse; bad fields are named."""
import json

import pytest

from condgen.training.config import ConfigError, TrainingConfig, load_config, parse_config

GRETEL_PARAMS_LAYOUT = """
schema_version: "1.0"
name: natural-language-gpt
models:
  - gpt_x:
      data_source: "__tmp__"
      pretrained_model: "gretelai/mpt-7b"
      column_name: null
      params:
        batch_size: 4
        epochs: 3
        steps: null
        weight_decay: 0.01
        warmup_steps: 100
        lr_scheduler: "linear"
        learning_rate: 0.0002
        max_tokens: 512
        gradient_accumulation_steps: 8
      peft_params:
        lora_r: 8
        lora_alpha_over_r: 1
      privacy_params:
        dp: false
      generate:
        num_records: 80
        maximum_text_length: 100
"""


def test_gretel_blueprint_with_params_block(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text(GRETEL_PARAMS_LAYOUT)
    config = load_config(path)
    assert config.name == "natural-language-gpt"
    assert config.pretrained_model == "gretelai/mpt-7b"
    assert (config.batch_size, config.epochs, config.steps) == (4, 3, None)
    assert config.learning_rate == 0.0002 and config.max_tokens == 512
    assert config.gradient_accumulation_steps == 8


def test_flat_gpt_x_layout_as_json(tmp_path):
    raw = {"schema_version": "1.0", "models": [{"gpt_x": {
        "data_source": "data.csv", "pretrained_model": "distilgpt2", "batch_size": 2, "steps": 10,
        "weight_decay": 0.1, "warmup_steps": 1, "lr_scheduler": "cosine", "learning_rate": 1e-4, "seed": 7}}]}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(raw))
    config = load_config(path)
    assert (config.steps, config.seed, config.lr_scheduler) == (10, 7, "cosine")


def _one(**gpt_x):
    return {"models": [{"gpt_x": gpt_x}]}


def test_unknown_field_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown field `learning_rat`.*`learning_rate`"):
        parse_config(_one(learning_rat=0.1))


def test_unknown_top_level_field():
    with pytest.raises(ConfigError, match="unknown field `modles`"):
        parse_config({"modles": []})


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="`batch_size` must be a int"):
        parse_config(_one(batch_size="eight"))


@pytest.mark.parametrize("gpt_x, message", [
    ({"learning_rate": 3.0}, "learning_rate"),
    ({"lr_scheduler": "exponential"}, "lr_scheduler"),
    ({"batch_size": 0}, "batch_size"),
    ({"steps": None, "epochs": None}, "steps"),
])
def test_bad_values(gpt_x, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(_one(**gpt_x))


def test_dp_is_refused():
    with pytest.raises(ConfigError, match="privacy"):
        parse_config(_one(privacy_params={"dp": True}))


def test_models_must_hold_one_gpt_x_block():
    with pytest.raises(ConfigError, match="gpt_x"):
        parse_config({"models": [{"actgan": {}}]})


def test_cli_overrides_win():
    config = TrainingConfig(steps=100).with_overrides(steps=5, pretrained_model="x", batch_size=None)
    assert (config.steps, config.pretrained_model, config.batch_size) == (5, "x", 8)
    assert TrainingConfig().with_overrides(epochs=2.0).steps is None


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
