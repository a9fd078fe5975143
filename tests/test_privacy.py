"""Differentially private fine-tuning (Gretel's privacy_params) on the tiny model: the privacy
plan and its refusals, DP-SGD with LoRA under Opacus, entities as units, and the guarantee
carried into the bundle."""

import csv
import dataclasses
import json

import pytest
from conftest import tiny_config

from condgen.training.config import ConfigError, PrivacyConfig, TrainingConfig


def test_dp_settings_it_cannot_honour_are_refused_in_one_line():
    """The plan needs no model: too few units for the batch, an epsilon no noise reaches."""
    from condgen.training.private import plan_privacy

    config = TrainingConfig(
        batch_size=16, gradient_accumulation_steps=8, steps=None, epochs=3, privacy=PrivacyConfig(dp=True)
    )
    plan = plan_privacy(config, 10_000)
    assert plan.batch == 128 and plan.steps == 235 and plan.sample_rate == pytest.approx(0.0128)
    assert plan.delta == pytest.approx(10_000**-1.2) and 0.3 < plan.noise_multiplier < 2
    stricter = plan_privacy(dataclasses.replace(config, privacy=PrivacyConfig(dp=True, epsilon=1)), 10_000)
    assert stricter.noise_multiplier > plan.noise_multiplier  # less privacy budget, more noise
    with pytest.raises(ConfigError, match="more units of privacy") as caught:
        plan_privacy(config, 100)
    assert "\n" not in str(caught.value)
    hopeless = dataclasses.replace(config, steps=100_000, epochs=None, privacy=PrivacyConfig(dp=True, epsilon=1e-3))
    with pytest.raises(ConfigError, match="cannot be reached") as caught:
        plan_privacy(hopeless, 200)
    assert "\n" not in str(caught.value)


def test_dp_with_lora_moves_the_adapters_lowers_the_loss_and_the_bundle_carries_its_epsilon(
    workdir, train_csv, train_records, tiny_base
):
    """LoRA under Opacus: the adapters change (merged into the attention weights), the logged loss
    falls, the spent epsilon is at most the target, and export carries the privacy block into the
    manifest. The bundle's prompt examples are the DP model's own lines."""
    import torch
    from transformers import AutoModelForCausalLM

    from condgen.training.export import export_bundle
    from condgen.training.finetune import finetune

    config = tiny_config(
        train_csv,
        tiny_base,
        steps=40,
        lora_r=8,
        lora_target_modules="all-linear",
        learning_rate=0.05,
        warmup_steps=0,
        logging_steps=10,
        privacy=PrivacyConfig(dp=True, epsilon=50.0),  # little noise, so that the fall is the signal
    )
    result = finetune(config, workdir / "dp-run")
    privacy = result.stats["privacy"]
    assert 45 < privacy["epsilon"] <= 50 and privacy["delta"] == pytest.approx(len(train_records) ** -1.2)
    assert privacy["unit"] == "row" and privacy["units"] == len(train_records) and privacy["noise_multiplier"] > 0.1
    losses = [entry["loss"] for entry in json.loads((result.output_dir / "metrics.json").read_text())["train"]]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.05, losses  # as much as LoRA moves it without DP
    base = AutoModelForCausalLM.from_pretrained(tiny_base).state_dict()
    tuned = AutoModelForCausalLM.from_pretrained(result.output_dir).state_dict()
    query = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(base[query], tuned[query])
    assert torch.equal(base["model.embed_tokens.weight"], tuned["model.embed_tokens.weight"])  # not a target
    examples = json.loads((result.output_dir / "examples.json").read_text())
    info = json.loads((result.output_dir / "condgen_training.json").read_text())
    assert examples and set(examples) <= {r.intent for r in train_records}
    assert info["intents"] == {intent: len(texts) for intent, texts in examples.items()}
    manifest = export_bundle(result.output_dir, workdir / "dp-bundle").manifest
    assert manifest.privacy == privacy and manifest.onnx.parity_top1_agreement == 1.0
    assert json.loads((workdir / "dp-bundle" / "condgen.json").read_text())["privacy"]["epsilon"] == privacy["epsilon"]


def test_entities_are_the_units_when_an_entity_column_is_named(workdir, train_csv, tiny_base):
    """All rows of one customer form one unit: 18 rows of 6 customers are 6 units."""
    from condgen.training.finetune import finetune

    with open(train_csv, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    by_customer = workdir / "customers.csv"
    with open(by_customer, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["customer", "text", "category"])
        writer.writeheader()
        writer.writerows({**row, "customer": f"c{i % 6}"} for i, row in enumerate(rows))
    config = tiny_config(
        by_customer, tiny_base, steps=4, batch_size=2, privacy=PrivacyConfig(dp=True, entity_column_name="customer")
    )
    result = finetune(config, workdir / "dp-entities")
    privacy = result.stats["privacy"]
    assert (privacy["unit"], privacy["units"]) == ("customer", 6)
    kept_back = json.loads((result.output_dir / "metrics.json").read_text())["not_private"]
    assert (kept_back["records"], kept_back["units_cut_at_max_tokens"]) == (18, 0)
    assert "train_loss" not in result.stats and "records" not in result.stats  # no plain statistic in the bundle
    blank = workdir / "customers-blank.csv"
    blank.write_text(by_customer.read_text().replace("\nc3,", "\n  ,", 1))
    with pytest.raises(ValueError, match="no value in the entity column 'customer'"):
        finetune(dataclasses.replace(config, data_source=str(blank)), workdir / "dp-blank")
    missing = dataclasses.replace(config, privacy=PrivacyConfig(dp=True, entity_column_name="account"))
    with pytest.raises(ValueError, match="entity column 'account' not found"):
        finetune(missing, workdir / "dp-missing")
    with pytest.raises(ConfigError, match="cannot resume"):
        finetune(config, workdir / "dp-entities", resume=True)


def test_the_canary_bench_trains_with_and_without_dp_and_ranks_every_canary(workdir, tiny_base, tmp_path):
    """`python -m condgen.bench.privacy` end to end on the tiny model: both runs on the same rows
    and steps, every canary ranked among its candidates, the DP run's epsilon within the target."""
    import math

    from conftest import BANKING77_TRAIN

    from condgen.bench.privacy import main

    out = tmp_path / "privacy.json"
    argv = ["--data", str(BANKING77_TRAIN), "--base-model", str(tiny_base), "--rows", "60", "--canaries", "2"]
    argv += ["--repeats", "3", "--epochs", "1", "--batch-size", "8", "--candidates", "31", "--samples", "2"]
    assert main([*argv, "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["settings"]["units"] == 66 and report["plan"]["steps"] == 9
    plain, private = report["without_dp"], report["with_dp"]
    assert plain["epsilon"] is None and plain["noise_multiplier"] == 0 and plain["max_grad_norm"] is None
    assert 0 < private["epsilon"] <= 8 and private["max_grad_norm"] == 1.0
    for run in (plain, private):
        assert len(run["canaries"]) == 2
        for canary in run["canaries"]:
            assert 1 <= canary["rank"] <= 32 and canary["candidates"] == 31
            assert canary["exposure"] == pytest.approx(math.log2(32) - math.log2(canary["rank"]), abs=1e-3)
            assert canary["samples"] == 2 and len(canary["secret"]) == 6
