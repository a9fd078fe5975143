"""Training configuration in the shape of Gretel's GPT-X config.

A config file (YAML or JSON) looks like Gretel's blueprints, so one written for that
service works here unchanged:

    schema_version: "1.0"
    name: banking77-generator
    models:
      - gpt_x:
          data_source: ../shared/data/banking77/train.csv
          pretrained_model: smollm2-135m
          params:            # Gretel's newer layout; the same keys may sit in gpt_x directly
            batch_size: 8
            steps: 300       # or epochs
            weight_decay: 0.01
            warmup_steps: 20
            lr_scheduler: cosine
            learning_rate: 0.0005
            max_tokens: 128  # tokens per packed training block
          seed: 42

Gretel's `peft_params` block (`lora_r`, `lora_alpha_over_r`, `target_modules`) trains LoRA
adapters with the peft library instead of every weight; they are merged into the base weights
before the checkpoint is written, so export and serving do not change. `lora_r: 0` (or no
block) is full fine-tuning. Its `privacy_params` block with `dp: true` trains with DP-SGD
(`condgen.training.private`); its `generate` block becomes the bundle's request defaults.

Numbers may be written as YAML 1.2 does (`5e-6`, `1E-4`, `.5`), which YAML 1.1 loaders read as
strings, and a numeric field given as a numeric string (`"0.001"`) is accepted. Unknown or
mistyped fields are errors that name the field and its closest valid name.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from condgen.errors import CondgenError

# Mixed precision of the forward and backward passes (weights and optimiser state stay fp32):
# auto takes bf16 where the hardware computes it natively (a CUDA GPU with bf16, a CPU with
# AVX-512 BF16 or AMX), else fp32.
PRECISIONS = ("auto", "bf16", "fp32")
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)
TOP_LEVEL_KEYS = ("schema_version", "name", "models")
# Top-level keys of Gretel's service that a training run does not use (accepted, ignored).
IGNORED_TOP_LEVEL = ("notifications", "label_predictors")
# Gretel's peft_params keys whose TrainingConfig field has another name.
PEFT_FIELDS = {"target_modules": "lora_target_modules"}
# gpt_x fields of Gretel's that condgen accepts only unset (null or empty), with the reason.
UNSET_ONLY = {
    "prompt_template": "condgen fine-tunes on `intent,text` lines and has no prompt templates",
    "validation": "condgen holds out a share of the lines: give `validation` as a fraction below 0.5",
    "ref_data": "condgen takes no reference data",
}
# Gretel's placeholders for "the data comes with the API call": condgen takes it from --data.
DATA_PLACEHOLDERS = ("__tmp__", "__temp__", "__")


class ConfigError(CondgenError, ValueError):
    """A configuration that cannot be used; the message names the field."""


# YAML 1.2's float forms that YAML 1.1 (PyYAML) leaves as strings: `5e-6`, `1E-4`, `.5`, `1_000.0`.
_YAML12_FLOAT = re.compile(r"""^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?$""")


class _GretelYamlLoader(yaml.SafeLoader):
    """SafeLoader that reads YAML 1.2 floats (`5e-6`) as numbers, as Gretel's service does."""


_GretelYamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+0123456789."))


@dataclass
class GenerateDefaults:
    """Gretel's `generate` block: what a request that leaves a field unset gets from the served
    bundle. `maximum_text_length` (tokens of one record) caps `max_new_tokens`, the tokens a
    sequence samples per round, so no record is longer. None: the server's own default."""

    num_records: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    maximum_text_length: int | None = None

    def validate(self) -> None:
        checks = {
            "num_records": self.num_records is None or self.num_records >= 1,
            "temperature": self.temperature is None or 0 <= self.temperature <= 5,
            "top_p": self.top_p is None or 0 < self.top_p <= 1,
            "top_k": self.top_k is None or self.top_k >= 0,
            "maximum_text_length": self.maximum_text_length is None or 1 <= self.maximum_text_length <= 512,
        }
        for key, fine in checks.items():
            if not fine:
                raise ConfigError(f"`generate.{key}` is out of range: {getattr(self, key)!r}")

    def as_set(self) -> dict:
        """The fields the config sets."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class PrivacyConfig:
    """Gretel's `privacy_params`: differentially private fine-tuning (DP-SGD with Opacus).

    Each optimiser step samples units (rows, or all rows of one entity when
    `entity_column_name` names a column) with probability batch / units (Poisson sampling),
    clips each unit's gradient to `per_sample_max_grad_norm` and adds Gaussian noise whose
    scale makes the whole run (`epsilon`, `delta`)-DP. `delta: auto` is 1 / units^1.2."""

    dp: bool = False
    epsilon: float = 8.0
    delta: float | str = "auto"
    per_sample_max_grad_norm: float = 1.0
    entity_column_name: str | None = None
    poisson_sampling: bool = True

    def validate(self) -> None:
        if not self.dp:
            return
        if not 0 < self.epsilon <= 100:
            raise ConfigError(f"`privacy_params.epsilon` must be in (0, 100], got {self.epsilon}")
        if self.delta != "auto" and not (isinstance(self.delta, (int, float)) and 0 < self.delta < 1):
            raise ConfigError(f"`privacy_params.delta` must be `auto` or in (0, 1), got {self.delta!r}")
        if not self.per_sample_max_grad_norm > 0:
            raise ConfigError(
                f"`privacy_params.per_sample_max_grad_norm` must be positive, got {self.per_sample_max_grad_norm}"
            )
        if not self.poisson_sampling:
            raise ConfigError(
                "`privacy_params.poisson_sampling: false` is not supported: the privacy accounting of "
                "condgen's DP-SGD assumes Poisson sampling; set it to true"
            )

    def resolved_delta(self, units: int) -> float:
        """`delta`, with `auto` as 1 / units^1.2 (smaller than 1/units, as DP needs)."""
        return 1.0 / units**1.2 if self.delta == "auto" else float(self.delta)

    @property
    def unit(self) -> str:
        """What one unit of privacy is: `row`, or the entity column's name."""
        return self.entity_column_name or "row"


@dataclass
class TrainingConfig:
    """Settings of one fine-tuning run (the `gpt_x` block, flattened)."""

    name: str = "condgen"
    data_source: str | None = None
    pretrained_model: str = "smollm2-135m"
    text_column: str | None = None
    label_column: str | None = None
    batch_size: int = 8
    epochs: float | None = None
    steps: int | None = 300
    weight_decay: float = 0.01
    warmup_steps: int = 20
    lr_scheduler: str = "cosine"
    learning_rate: float = 5e-4
    seed: int = 42
    max_tokens: int = 128
    gradient_accumulation_steps: int = 1
    validation_fraction: float = 0.05
    eval_steps: int = 50
    save_steps: int = 50
    logging_steps: int = 10
    separator: str = ","
    # Pack each intent's lines next to each other, as generation prompts show them, so the
    # model learns to write a new line of the intent its context shows.
    group_by_intent: bool = False
    precision: str = "auto"  # one of PRECISIONS
    # LoRA (Gretel's peft_params): rank 0 is full fine-tuning. Target modules: a list of module
    # names, a regular expression (peft matches it against full module names) or "all-linear".
    lora_r: int = 0
    lora_alpha_over_r: float = 1.0
    lora_target_modules: str | list[str] = "all-linear"
    generate: GenerateDefaults = dataclasses.field(default_factory=GenerateDefaults)
    privacy: PrivacyConfig = dataclasses.field(default_factory=PrivacyConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.steps is None and self.epochs is None:
            raise ConfigError("set either `steps` or `epochs`")
        positive: dict[str, float] = {
            "batch_size": self.batch_size,
            "max_tokens": self.max_tokens,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "eval_steps": self.eval_steps,
            "save_steps": self.save_steps,
            "logging_steps": self.logging_steps,
        }
        if self.steps is not None:
            positive["steps"] = self.steps
        if self.epochs is not None:
            positive["epochs"] = self.epochs
        for key, value in positive.items():
            if value <= 0:
                raise ConfigError(f"`{key}` must be positive, got {value}")
        if not 0 < self.learning_rate < 1:
            raise ConfigError(f"`learning_rate` must be between 0 and 1, got {self.learning_rate}")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            raise ConfigError("`weight_decay` and `warmup_steps` must not be negative")
        if not 0 <= self.validation_fraction < 0.5:
            raise ConfigError(f"`validation_fraction` must be in [0, 0.5), got {self.validation_fraction}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"`precision` {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if isinstance(self.generate, dict):  # read back from a checkpoint's config
            self.generate = GenerateDefaults(**self.generate)
        self.generate.validate()
        if isinstance(self.privacy, dict):
            self.privacy = PrivacyConfig(**self.privacy)
        self.privacy.validate()
        if self.lora_r < 0 or self.lora_alpha_over_r <= 0:
            raise ConfigError("`lora_r` must be 0 (full fine-tuning) or positive, `lora_alpha_over_r` positive")
        targets = self.lora_target_modules
        if not (isinstance(targets, str) and targets.strip()) and not (
            isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)
        ):
            raise ConfigError(
                f"`target_modules` must be a list of module names, a regular expression or all-linear, got {targets!r}"
            )
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ConfigError(f"`lr_scheduler` {self.lr_scheduler!r} is not one of {', '.join(LR_SCHEDULERS)}")

    def with_overrides(self, **overrides: Any) -> TrainingConfig:
        """A copy with the non-None overrides applied (CLI flags win over the file)."""
        changes = {k: v for k, v in overrides.items() if v is not None}
        if "steps" in changes:
            changes.setdefault("epochs", None)
        if "epochs" in changes and "steps" not in changes:
            changes["steps"] = None
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _field_types() -> dict[str, type | tuple]:
    kinds: dict[str, type | tuple] = {}
    for f in fields(TrainingConfig):
        text = str(f.type)
        if text == "bool":
            kinds[f.name] = bool
        elif "float" in text:
            kinds[f.name] = (int, float)
        elif "int" in text:
            kinds[f.name] = int
        else:
            kinds[f.name] = str
    return kinds


def _unknown(key: str, valid, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(valid), n=1)
    hint = f"; did you mean `{close[0]}`?" if close else f"; valid fields: {', '.join(sorted(valid))}"
    return ConfigError(f"unknown field `{key}` in {where}{hint}")


def _number_from_text(value: str, expected: type | tuple) -> int | float | None:
    """A numeric string as the number a numeric field wants; None when it is not one."""
    text = value.strip()
    if not _YAML12_FLOAT.match(text) and text.lower() not in ("inf", "-inf", "+inf"):
        return None
    number = float(text.replace("_", ""))
    if expected is int:
        return int(number) if number.is_integer() else None
    return number


def _check_value(key: str, value: Any, kinds: dict) -> Any:
    if value is None:
        return None
    expected = kinds[key]
    if isinstance(value, str) and expected not in (str, bool):
        number = _number_from_text(value, expected)
        value = number if number is not None else value
    if (isinstance(value, bool) and expected is not bool) or not isinstance(value, expected):
        names = expected.__name__ if isinstance(expected, type) else "number"
        raise ConfigError(f"field `{key}` must be a {names}, got {value!r}")
    return value


def _flatten_gpt_x(block: dict) -> dict:
    """Merge the `params` sub-block into gpt_x; map Gretel names to ours; drop ignored blocks."""
    kinds = _field_types()
    flat: dict[str, Any] = {}
    for key, value in block.items():
        if key == "params":
            if not isinstance(value, dict):
                raise ConfigError("`params` must be a mapping")
            for inner, inner_value in value.items():
                if inner not in kinds:
                    raise _unknown(inner, kinds, "models[0].gpt_x.params")
                flat[inner] = _check_value(inner, inner_value, kinds)
        elif key == "column_name":
            flat["text_column"] = _check_value("text_column", value, kinds)
        elif key == "validation" and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            flat["validation_fraction"] = _check_value("validation_fraction", value, kinds)
        elif key == "peft_params":
            flat.update(_peft_fields(value))
        elif key == "generate":
            flat["generate"] = _generate_defaults(value)
        elif key == "privacy_params":
            flat["privacy"] = _privacy_params(value)
        elif key in UNSET_ONLY:
            if value not in (None, {}, [], ""):
                raise ConfigError(
                    f"`{key}` is set, which condgen cannot honour: {UNSET_ONLY[key]}; remove it or set it to null"
                )
        elif key == "data_source" and value in DATA_PLACEHOLDERS:
            continue  # the data comes from --data
        elif key in kinds:
            flat[key] = _check_value(key, value, kinds)
        else:
            raise _unknown(
                key,
                list(kinds) + ["params", "column_name", "privacy_params", "peft_params", "generate", *UNSET_ONLY],
                "models[0].gpt_x",
            )
    return flat


def _checked_block(name: str, block: Any, kinds: dict[str, Any]) -> dict:
    """A Gretel sub-block (`peft_params`, `generate`) as {key: value}: unknown keys are errors,
    null values are left out, values of keys with a kind are checked (None: taken as written)."""
    if block in (None, {}):
        return {}
    if not isinstance(block, dict):
        raise ConfigError(f"`{name}` must be a mapping")
    values = {}
    for key, value in block.items():
        if key not in kinds:
            raise _unknown(key, kinds, f"models[0].gpt_x.{name}")
        if value is not None:
            values[key] = value if kinds[key] is None else _check_value(key, value, kinds)
    return values


def _peft_fields(block: Any) -> dict:
    """Gretel's `peft_params` as TrainingConfig fields (an empty or null block: full fine-tuning)."""
    values = _checked_block(
        "peft_params", block, {"lora_r": int, "lora_alpha_over_r": (int, float), "target_modules": None}
    )
    targets = values.get("target_modules")
    if isinstance(targets, (list, tuple)):
        values["target_modules"] = list(targets)
    return {PEFT_FIELDS.get(key, key): value for key, value in values.items()}


def _generate_defaults(block: Any) -> GenerateDefaults:
    """Gretel's `generate` block, checked."""
    number = (int, float)
    kinds = {"num_records": int, "temperature": number, "top_p": number, "top_k": int, "maximum_text_length": int}
    values = _checked_block("generate", block, kinds)
    for key in ("temperature", "top_p"):
        if key in values:
            values[key] = float(values[key])
    return GenerateDefaults(**values)


def _privacy_params(block: Any) -> PrivacyConfig:
    """Gretel's `privacy_params` block, checked (`delta` is a number or `auto`)."""
    number = (int, float)
    kinds = {
        "dp": bool,
        "epsilon": number,
        "delta": None,
        "per_sample_max_grad_norm": number,
        "entity_column_name": str,
        "poisson_sampling": bool,
    }
    values = _checked_block("privacy_params", block, kinds)
    delta = values.get("delta")
    if isinstance(delta, str) and delta != "auto":
        delta = _number_from_text(delta, (int, float))
        if delta is None:
            raise ConfigError(f"`privacy_params.delta` must be `auto` or a number, got {values['delta']!r}")
        values["delta"] = delta
    for key in ("epsilon", "per_sample_max_grad_norm"):
        if key in values:
            values[key] = float(values[key])
    return PrivacyConfig(**values)


def parse_config(raw: Any) -> TrainingConfig:
    """Build a TrainingConfig from a parsed YAML/JSON document."""
    if not isinstance(raw, dict):
        raise ConfigError("the config must be a mapping with a `models:` list")
    for key in raw:
        if key not in TOP_LEVEL_KEYS + IGNORED_TOP_LEVEL:
            raise _unknown(key, TOP_LEVEL_KEYS, "the top level")
    models = raw.get("models")
    if not isinstance(models, list) or len(models) != 1:
        raise ConfigError("`models` must be a list with exactly one `gpt_x:` entry")
    entry = models[0]
    if not isinstance(entry, dict) or list(entry) != ["gpt_x"]:
        keys = list(entry) if isinstance(entry, dict) else entry
        raise ConfigError(f"models[0] must be a `gpt_x:` block, got {keys!r}")
    block = entry["gpt_x"] or {}
    if not isinstance(block, dict):
        raise ConfigError("`gpt_x` must be a mapping")
    flat = _flatten_gpt_x(block)
    if "name" in raw:
        flat["name"] = str(raw["name"])
    if "epochs" in flat and flat["epochs"] is not None and "steps" not in flat:
        flat["steps"] = None
    try:
        return TrainingConfig(**flat)
    except TypeError as exc:
        raise ConfigError(str(exc)) from exc


def load_config(path: str | Path | None) -> TrainingConfig:
    """Read a YAML or JSON config file; None gives the defaults."""
    if path is None:
        return TrainingConfig()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.load(text, Loader=_GretelYamlLoader)  # noqa: S506 - a SafeLoader
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from exc
    return parse_config(raw)
