"""Fine-tuning a tiny model, resuming it, its metrics and loss curve, exporting it with the parity
check, bundle checks."""

import json
import math
import shutil
import struct

import pytest
from conftest import tiny_config

from condgen.bundle import BundleError, read_manifest


def test_finetune_learns_and_reports_validation_loss(workdir, train_csv, tiny_base):
    from condgen.training.finetune import finetune

    config = tiny_config(train_csv, tiny_base, steps=20, validation_fraction=0.2, eval_steps=10, precision="bf16")
    result = finetune(config, workdir / "short-run")
    stats = result.stats
    assert stats["optimizer_steps"] == 20 and stats["precision"] == "bf16"
    assert math.isfinite(stats["train_loss"])
    assert stats["validation_records"] >= 1 and stats["validation_loss"] is not None
    info = json.loads((result.output_dir / "condgen_training.json").read_text())
    assert info["config"]["steps"] == 20 and set(info["intents"]) == {
        "card_arrival",
        "lost_or_stolen_card",
        "exchange_rate",
    }
    assert (result.output_dir / "examples.json").is_file()


def test_bf16_is_chosen_only_where_the_cpu_computes_it(tmp_path):
    from condgen.training.finetune import cpu_computes_bf16, uses_bf16

    def cpuinfo(flags: str):
        path = tmp_path / f"cpuinfo-{len(list(tmp_path.iterdir()))}"
        path.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 avx2 {flags}\n\nprocessor\t: 1\n")
        return path

    assert cpu_computes_bf16(cpuinfo("avx512f avx512_bf16"))
    assert cpu_computes_bf16(cpuinfo("amx_tile amx_bf16"))
    assert not cpu_computes_bf16(cpuinfo("avx512f avx512_vnni"))
    assert not cpu_computes_bf16(tmp_path / "missing")
    assert uses_bf16("bf16") and not uses_bf16("fp32")


def test_resume_continues_to_the_same_step_count(workdir, train_csv, tiny_base):
    from condgen.training.finetune import finetune

    out = workdir / "resumable"
    first = finetune(tiny_config(train_csv, tiny_base, steps=4, save_steps=2, logging_steps=2), out)
    assert first.stats["optimizer_steps"] == 4
    resumed = finetune(tiny_config(train_csv, tiny_base, steps=8, save_steps=2, logging_steps=2), out, resume=True)
    assert resumed.stats["resumed_from"] == "checkpoint-4"
    assert resumed.stats["optimizer_steps"] == 8
    metrics = json.loads((out / "metrics.json").read_text())  # the steps before the resume are kept
    assert metrics["resumed_from"] == "checkpoint-4" and metrics["global_step"] == 8
    assert [row["step"] for row in metrics["train"]] == [2, 4, 6, 8]


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", f"{path} is not a PNG"
    assert data.endswith(b"IEND\xaeB`\x82"), f"{path} is truncated"
    return struct.unpack(">II", data[16:24])


def test_finetune_writes_metrics_and_a_loss_curve(checkpoint):
    config = json.loads((checkpoint / "condgen_training.json").read_text())["config"]
    metrics = json.loads((checkpoint / "metrics.json").read_text())
    steps, every = config["steps"], config["logging_steps"]
    assert metrics["complete"] and metrics["world_size"] == 1 and metrics["resumed_from"] is None
    assert metrics["global_step"] == metrics["max_steps"] == steps
    assert [row["step"] for row in metrics["train"]] == list(range(every, steps + 1, every))
    for row in metrics["train"]:
        assert math.isfinite(row["loss"]) and row["loss"] > 0
        assert math.isfinite(row["learning_rate"]) and row["learning_rate"] >= 0 and row["epoch"] > 0
    assert metrics["train"][-1]["loss"] < metrics["train"][0]["loss"]
    summary = metrics["summary"]
    assert summary["step"] == steps and summary["train_runtime"] > 0 and summary["train_samples_per_second"] > 0
    assert math.isfinite(summary["train_loss"])
    assert metrics["eval"] == []  # the fixture holds out no validation records
    width, height = png_size(checkpoint / "loss_curve.png")
    assert width >= 300 and height >= 200
    assert not list(checkpoint.glob("*.partial"))


def test_metrics_split_the_log_history_and_null_non_finite_losses():
    from condgen.training.finetune import training_metrics

    history = [
        {"loss": 2.5, "grad_norm": 1.0, "learning_rate": 1e-3, "epoch": 0.5, "step": 10},
        {"eval_loss": 2.7, "eval_runtime": 0.1, "epoch": 0.5, "step": 10},
        {"loss": float("nan"), "grad_norm": float("inf"), "learning_rate": 5e-4, "epoch": 1.0, "step": 20},
        {
            "train_runtime": 3.0,
            "train_samples_per_second": 40.0,
            "train_steps_per_second": 6.6,
            "total_flos": 1.0,
            "train_loss": 2.1,
            "epoch": 1.0,
            "step": 20,
        },
    ]
    metrics = training_metrics(history, global_step=20, world_size=2)
    assert [row["step"] for row in metrics["train"]] == [10, 20]
    assert metrics["train"][1]["loss"] is None and metrics["train"][1]["grad_norm"] is None
    assert metrics["eval"] == [history[1]] and metrics["summary"]["train_runtime"] == 3.0
    assert metrics["global_step"] == 20 and metrics["world_size"] == 2
    json.dumps(metrics, allow_nan=False)


def test_loss_curve_is_drawn_without_any_logged_loss(tmp_path):
    from condgen.training.plots import plot_loss_curve

    path = plot_loss_curve(tmp_path / "loss_curve.png", {"train": [], "eval": [], "global_step": 3})
    assert png_size(path)[0] > 0


def test_steps_from_epochs_count_the_batch_of_every_process():
    from condgen.training.config import TrainingConfig
    from condgen.training.finetune import planned_steps

    config = TrainingConfig(data_source="x.csv", steps=None, epochs=2, batch_size=4)
    assert planned_steps(config, blocks_per_pass=40) == 20
    assert planned_steps(config, blocks_per_pass=40, processes=2) == 10
    assert planned_steps(TrainingConfig(data_source="x.csv", steps=7), 40, processes=4) == 7


def test_checkpoint_overfits_the_training_lines(checkpoint):
    info = json.loads((checkpoint / "condgen_training.json").read_text())
    assert info["stats"]["train_loss"] < 2.0


def test_export_writes_a_checked_bundle(bundle):
    manifest = read_manifest(bundle)
    assert manifest.onnx.parity_max_abs_diff < 1e-3
    assert manifest.onnx.parity_greedy_match == 1.0  # fp32: the same greedy continuation as PyTorch
    assert manifest.onnx.past_key_names[0] == "past_key_values.0.key"
    assert {"model.onnx", "tokenizer.json", "examples.json"} <= set(manifest.files)
    assert manifest.intents == {"card_arrival": 6, "lost_or_stolen_card": 6, "exchange_rate": 6}
    assert manifest.text_length["min"] >= 15


def test_export_fails_above_the_parity_tolerance(workdir, checkpoint):
    from condgen.training.export import ExportError, export_bundle

    with pytest.raises(ExportError, match="differ from PyTorch"):
        export_bundle(checkpoint, workdir / "never-servable", tolerance=-1.0)
    assert not (workdir / "never-servable" / "condgen.json").exists()


def test_tampered_or_incomplete_bundles_are_refused(tmp_path, bundle):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    examples = copy / "examples.json"
    examples.write_text(examples.read_text().replace("card", "caard", 1))
    with pytest.raises(BundleError, match="checksum"):
        read_manifest(copy)
    (copy / "tokenizer.json").unlink()
    shutil.copy(bundle / "examples.json", examples)
    with pytest.raises(BundleError, match="missing"):
        read_manifest(copy)
    manifest = json.loads((copy / "condgen.json").read_text())
    manifest["format_version"] = 99
    (copy / "condgen.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="version 99"):
        read_manifest(copy)


def test_version_1_bundles_without_rewrites_are_still_read(tmp_path, bundle):
    manifest = json.loads((bundle / "condgen.json").read_text())
    assert manifest["format_version"] == 2
    manifest["format_version"] = 1
    del manifest["onnx"]["rewrites"]  # written before the graph rewrites: optimum's graph as exported
    (tmp_path / "condgen.json").write_text(json.dumps(manifest))
    assert read_manifest(tmp_path, verify=False).onnx.rewrites == []


def test_embedding_tables_quantised_to_8_bits_look_up_within_half_a_step():
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from condgen.training.graph import quantize_embedding_tables

    table = np.random.default_rng(0).standard_normal((50, 64)).astype(np.float32)
    table[7, :32] = 0.0  # an all-zero block keeps a usable scale
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["rows"])],
        "embedding",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [None, None])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, [None, None, 64])],
        initializer=[numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    )
    assert quantize_embedding_tables(model, block=32) == 1
    assert [n.op_type for n in model.graph.node] == ["GatherBlockQuantized"]
    assert {t.name for t in model.graph.initializer} == {"table_q8", "table_scales", "table_zero_points"}
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([[0, 7, 49], [3, 3, 12]], dtype=np.int64)
    rows = session.run(None, {"ids": ids})[0]
    steps = np.abs(table).reshape(50, 2, 32).max(axis=-1) / 127
    assert rows.shape == (2, 3, 64)
    assert (np.abs(rows - table[ids]) <= np.repeat(steps[ids], 32, axis=-1) / 2 + 1e-6).all()
    assert (rows[0, 1, :32] == 0).all()
    onnx.checker.check_model(model)


@pytest.mark.parametrize("variant", ["int8", "fp16", "w8", "w4"])
def test_lighter_variants_export_with_their_parity_figures(workdir, checkpoint, variant):
    import numpy as np

    from condgen.server.engine import Engine
    from condgen.training.export import export_bundle

    result = export_bundle(checkpoint, workdir / f"bundle-{variant}", variant=variant, min_top1=0.8)
    info = read_manifest(result.bundle_dir).onnx
    assert info.variant == variant and info.parity_top1_agreement >= 0.8
    assert 0.0 <= info.parity_greedy_match <= 1.0
    assert info.dtype == ("float16" if variant == "fp16" else "float32")
    if variant in ("w8", "w4"):
        import onnx

        nodes = onnx.load(str(result.bundle_dir / "model.onnx")).graph.node
        assert "GatherBlockQuantized" in {node.op_type for node in nodes}  # the embedding table
        # The tied LM head (MatMul over a Transpose of the embedding) is quantised too.
        assert next(node for node in nodes if "logits" in node.output).op_type == "MatMulNBits"
    engine = Engine(result.bundle_dir, read_manifest(result.bundle_dir))
    batch = engine.new_batch(0, engine.encode("card_arrival,"))
    logits = engine.forward(batch)
    assert logits.shape == (1, engine.vocab_size) and np.isfinite(logits.astype(np.float32)).all()


def test_lora_from_peft_params_trains_adapters_merges_them_and_exports_with_parity(workdir, train_csv, tiny_base):
    """Gretel's peft_params take effect: only the adapters train (the embeddings stay the
    base's), the checkpoint is a plain model with the adapters merged (the target weights
    moved), it records LoRA's settings, and the bundle passes the same parity checks."""
    import torch
    from transformers import AutoModelForCausalLM

    from condgen.training.config import parse_config
    from condgen.training.export import export_bundle
    from condgen.training.finetune import finetune

    gretel = parse_config(
        {
            "models": [
                {
                    "gpt_x": {
                        "peft_params": {"lora_r": 4, "lora_alpha_over_r": 2, "target_modules": ["q_proj", "v_proj"]}
                    }
                }
            ]
        }
    )
    config = tiny_config(
        train_csv,
        tiny_base,
        steps=60,
        lora_r=gretel.lora_r,
        lora_alpha_over_r=gretel.lora_alpha_over_r,
        lora_target_modules=gretel.lora_target_modules,
    )
    result = finetune(config, workdir / "lora-run")
    lora = result.stats["lora"]
    assert lora["r"] == 4 and lora["alpha"] == 8 and lora["target_modules"] == ["q_proj", "v_proj"]
    assert 0 < lora["trainable_parameters"] < lora["total_parameters"] / 5
    base = AutoModelForCausalLM.from_pretrained(tiny_base).state_dict()
    tuned = AutoModelForCausalLM.from_pretrained(result.output_dir).state_dict()
    assert not any("lora" in name for name in tuned)  # merged: a plain checkpoint
    assert torch.equal(base["model.embed_tokens.weight"], tuned["model.embed_tokens.weight"])
    query = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(base[query], tuned[query])
    assert torch.equal(base["model.layers.0.mlp.up_proj.weight"], tuned["model.layers.0.mlp.up_proj.weight"])
    manifest = export_bundle(result.output_dir, workdir / "lora-bundle").manifest
    assert manifest.lora == lora and manifest.onnx.parity_top1_agreement == 1.0
    assert json.loads((workdir / "lora-bundle" / "condgen.json").read_text())["lora"]["r"] == 4


def test_peft_params_are_checked_and_full_fine_tuning_records_no_lora(workdir, checkpoint):
    from condgen.training.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="did you mean `lora_r`"):
        parse_config({"models": [{"gpt_x": {"peft_params": {"lora_rank": 8}}}]})
    with pytest.raises(ConfigError, match="lora_r"):
        parse_config({"models": [{"gpt_x": {"peft_params": {"lora_r": -1}}}]})
    assert parse_config({"models": [{"gpt_x": {"peft_params": None}}]}).lora_r == 0
    info = json.loads((checkpoint / "condgen_training.json").read_text())
    assert "lora" not in info["stats"]


def test_a_lora_run_resumes_from_its_adapter_checkpoint(workdir, train_csv, tiny_base):
    from condgen.training.finetune import finetune

    out = workdir / "lora-resumable"
    lora = dict(lora_r=4, save_steps=2, logging_steps=2)
    assert finetune(tiny_config(train_csv, tiny_base, steps=4, **lora), out).stats["optimizer_steps"] == 4
    resumed = finetune(tiny_config(train_csv, tiny_base, steps=8, **lora), out, resume=True)
    assert resumed.stats["resumed_from"] == "checkpoint-4" and resumed.stats["optimizer_steps"] == 8
    assert resumed.stats["lora"]["r"] == 4
