"""Gretel-shaped training configs: both layouts parse; bad fields are named."""

import json

import pytest

from condgen.training.config import ConfigError, TrainingConfig, load_config, parse_config

pytestmark = pytest.mark.fast

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
    raw = {
        "schema_version": "1.0",
        "models": [
            {
                "gpt_x": {
                    "data_source": "data.csv",
                    "pretrained_model": "distilgpt2",
                    "batch_size": 2,
                    "steps": 10,
                    "weight_decay": 0.1,
                    "warmup_steps": 1,
                    "lr_scheduler": "cosine",
                    "learning_rate": 1e-4,
                    "seed": 7,
                }
            }
        ],
    }
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


@pytest.mark.parametrize(
    "gpt_x, message",
    [
        ({"learning_rate": 3.0}, "learning_rate"),
        ({"lr_scheduler": "exponential"}, "lr_scheduler"),
        ({"precision": "fp16"}, "precision"),
        ({"batch_size": 0}, "batch_size"),
        ({"steps": None, "epochs": None}, "steps"),
    ],
)
def test_bad_values(gpt_x, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(_one(**gpt_x))


def test_privacy_params_are_read_and_checked():
    privacy = parse_config(_one(privacy_params={"dp": True})).privacy
    assert (privacy.dp, privacy.epsilon, privacy.delta, privacy.per_sample_max_grad_norm) == (True, 8.0, "auto", 1.0)
    assert privacy.unit == "row" and privacy.resolved_delta(1000) == pytest.approx(1000**-1.2)
    written = {"dp": True, "epsilon": "5", "delta": "1e-6", "entity_column_name": "customer_id"}
    privacy = parse_config(_one(privacy_params=written)).privacy
    assert (privacy.epsilon, privacy.delta, privacy.unit) == (5.0, 1e-6, "customer_id")
    assert parse_config(_one(privacy_params={"dp": False, "epsilon": 8})).privacy.dp is False
    for bad, message in [
        ({"dp": True, "epsilon": 0}, "epsilon"),
        ({"dp": True, "delta": 1.5}, "delta"),
        ({"dp": True, "delta": "often"}, "delta"),
        ({"dp": True, "per_sample_max_grad_norm": 0}, "per_sample_max_grad_norm"),
        ({"dp": True, "poisson_sampling": False}, "poisson_sampling"),
        ({"dp": True, "epsilom": 8}, "did you mean `epsilon`"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_config(_one(privacy_params=bad))


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


# The shapes of Gretel's public gpt_x blueprints (written here, not copied): the flat layout
# with YAML 1.2 numbers, the `params` layout with `gretelai/gpt-auto`, and the DP one.
GRETEL_FLAT_GPT = """
schema_version: "1.0"
name: "natural-language-gpt"
models:
  - gpt_x:
      data_source: "__tmp__"
      pretrained_model: 'EleutherAI/gpt-neo-125M'
      batch_size: 4
      epochs: 3
      weight_decay: 0.1
      warmup_steps: 100
      lr_scheduler: "cosine"
      learning_rate: 5e-6
"""

GRETEL_GPT_AUTO = """
schema_version: "1.0"
name: "natural-language-gpt"
models:
  - gpt_x:
      data_source: "__temp__"
      pretrained_model: "gretelai/gpt-auto"
      column_name: null
      params:
        batch_size: 4
        steps: 750
        weight_decay: 0.01
        warmup_steps: 100
        lr_scheduler: "linear"
        learning_rate: 0.0001
        max_tokens: 128
      generate:
        num_records: 1000
        maximum_text_length: 128
"""

GRETEL_DP = """
schema_version: "1.0"
name: "natural-language-dp"
models:
  - gpt_x:
      data_source: "__temp__"
      pretrained_model: "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
      column_name: null
      params:
        batch_size: 16
        gradient_accumulation_steps: 8
        epochs: 3
        weight_decay: 0.01
        warmup_steps: 100
        lr_scheduler: "linear"
        learning_rate: 0.001
        max_tokens: 128
      peft_params:
        lora_r: 8
        lora_alpha_over_r: 1
      privacy_params:
        dp: true
        epsilon: 5
        delta: auto
      generate:
        num_records: 1000
        maximum_text_length: 128
"""


def _load(tmp_path, text):
    path = tmp_path / "blueprint.yml"
    path.write_text(text)
    return load_config(path)


def test_gretel_flat_blueprint_reads_yaml12_numbers(tmp_path):
    config = _load(tmp_path, GRETEL_FLAT_GPT)
    assert config.learning_rate == pytest.approx(5e-6)
    assert (config.batch_size, config.epochs, config.steps) == (4, 3, None)
    assert (config.weight_decay, config.warmup_steps, config.lr_scheduler) == (0.1, 100, "cosine")
    assert config.pretrained_model == "EleutherAI/gpt-neo-125M"


def test_gretel_gpt_auto_blueprint_loads_and_maps_to_the_default_model(tmp_path):
    from condgen.training.base_models import resolve_model_name

    config = _load(tmp_path, GRETEL_GPT_AUTO)
    assert (config.steps, config.lr_scheduler, config.max_tokens) == (750, "linear", 128)
    assert resolve_model_name(config.pretrained_model) == "smollm2-135m"
    assert resolve_model_name("distilgpt2") == "distilgpt2"


def test_gretel_dp_blueprint_loads_with_lora_and_its_epsilon(tmp_path):
    config = _load(tmp_path, GRETEL_DP)
    assert config.privacy.dp and config.privacy.epsilon == 5.0 and config.privacy.delta == "auto"
    assert (config.lora_r, config.batch_size * config.gradient_accumulation_steps, config.epochs) == (8, 128, 3)


@pytest.mark.parametrize(
    "written, value",
    [("5e-6", 5e-6), ("1E-4", 1e-4), (".5", 0.5), ("2.5e-5", 2.5e-5), ("'5e-6'", 5e-6), ('"0.001"', 0.001)],
)
def test_numbers_in_yaml12_form_and_numeric_strings(tmp_path, written, value):
    config = _load(tmp_path, f"models:\n  - gpt_x:\n      learning_rate: {written}\n")
    assert config.learning_rate == pytest.approx(value)


def test_numeric_strings_of_integer_fields_and_what_stays_refused():
    assert parse_config(_one(batch_size="4", epochs="3")).batch_size == 4
    with pytest.raises(ConfigError, match="`batch_size` must be a int, got '4.5'"):
        parse_config(_one(batch_size="4.5"))
    with pytest.raises(ConfigError, match="`learning_rate` must be a number, got 'fast'"):
        parse_config(_one(learning_rate="fast"))


def test_a_model_that_cannot_be_loaded_says_to_pass_base_model(tmp_path):
    from condgen.training.base_models import BaseModelError, load_base_model

    with pytest.raises(BaseModelError, match="--base-model") as caught:
        load_base_model(str(tmp_path / "no-such-model"))
    assert "smollm2-135m" in str(caught.value)


GRETEL_FULL_DEFAULTS = """
schema_version: "1.0"
name: "natural-language-gpt"
notifications: null
label_predictors: null
models:
  - gpt_x:
      data_source: "__"
      pretrained_model: "gretelai/gpt-auto"
      prompt_template: null
      column_name: null
      validation: null
      ref_data: {}
      params:
        batch_size: 4
        epochs: null
        steps: 750
        weight_decay: 0.01
        warmup_steps: 100
        lr_scheduler: "linear"
        learning_rate: 0.0001
        max_tokens: 512
        gradient_accumulation_steps: 8
      peft_params: {lora_r: 8, lora_alpha_over_r: 1.0, target_modules: null}
      privacy_params: {dp: false, epsilon: 8.0, delta: "auto", per_sample_max_grad_norm: 1.0}
      generate: {num_records: 80, maximum_text_length: 100, top_p: 0.9, top_k: 43, temperature: null}
"""


def test_gretel_blueprint_with_every_default_written_out(tmp_path):
    config = _load(tmp_path, GRETEL_FULL_DEFAULTS)
    assert (config.steps, config.max_tokens, config.gradient_accumulation_steps) == (750, 512, 8)
    assert config.data_source is None  # Gretel's placeholder: the data comes from --data
    # peft_params take effect: LoRA r=8, alpha/r 1, adapters on every linear layer (target_modules null)
    assert (config.lora_r, config.lora_alpha_over_r, config.lora_target_modules) == (8, 1.0, "all-linear")


def test_validation_as_a_fraction_is_the_held_out_share(tmp_path):
    assert _load(tmp_path, "models:\n  - gpt_x:\n      validation: 0.1\n").validation_fraction == 0.1


@pytest.mark.parametrize(
    "field, value", [("prompt_template", "'{text}'"), ("validation", "{split: 0.1}"), ("ref_data", "{data: x.csv}")]
)
def test_gretel_fields_condgen_cannot_honour_are_refused_in_one_line(tmp_path, field, value):
    with pytest.raises(ConfigError, match=f"`{field}` is set, which condgen cannot honour") as caught:
        _load(tmp_path, f"models:\n  - gpt_x:\n      {field}: {value}\n")
    assert "\n" not in str(caught.value)


def test_boolean_fields_take_booleans():
    assert parse_config(_one(group_by_intent=True)).group_by_intent is True
    with pytest.raises(ConfigError, match="`group_by_intent` must be a bool"):
        parse_config(_one(group_by_intent="yes please"))


def test_an_unreachable_hub_id_fails_at_once_saying_to_pass_base_model(monkeypatch):
    import time

    from condgen.training.base_models import BaseModelError, load_base_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with pytest.raises(BaseModelError, match="--base-model smollm2-135m"):
        load_base_model("EleutherAI/gpt-neo-125M")
    assert time.monotonic() - started < 30


def test_the_generate_block_is_read_checked_and_exported_as_the_bundle_defaults():
    from condgen.training.export import bundle_generate_defaults

    config = parse_config(_one_block(generate={"num_records": 80, "maximum_text_length": 100, "top_p": 0.9}))
    assert config.generate.as_set() == {"num_records": 80, "maximum_text_length": 100, "top_p": 0.9}
    assert bundle_generate_defaults(config.to_dict()) == {"num_records": 80, "top_p": 0.9, "maximum_text_length": 100}
    assert bundle_generate_defaults(parse_config(_one_block()).to_dict()) is None
    with pytest.raises(ConfigError, match="did you mean `temperature`"):
        parse_config(_one_block(generate={"temprature": 0.5}))
    with pytest.raises(ConfigError, match="generate.top_p"):
        parse_config(_one_block(generate={"top_p": 1.5}))


def _one_block(**blocks):
    return {"models": [{"gpt_x": dict(blocks)}]}
