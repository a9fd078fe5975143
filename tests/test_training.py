"""Fine-tuning a tiny model, resuming it, exporting it with the parity check, bundle checks."""
import json
import shutil

import pytest

from condgen.bundle import BundleError, read_manifest
from conftest import tiny_config


def test_finetune_learns_and_reports_validation_loss(workdir, train_csv, tiny_base):
    from condgen.training.finetune import finetune

    config = tiny_config(train_csv, tiny_base, steps=20, validation_fraction=0.2, eval_steps=10)
    result = finetune(config, workdir / "short-run")
    stats = result.stats
    assert stats["optimizer_steps"] == 20
    assert stats["validation_records"] >= 1 and stats["validation_loss"] is not None
    info = json.loads((result.output_dir / "condgen_training.json").read_text())
    assert info["config"]["steps"] == 20 and set(info["intents"]) == {"card_arrival", "lost_or_stolen_card",
                                                                      "exchange_rate"}
    assert (result.output_dir / "examples.json").is_file()


def test_resume_continues_to_the_same_step_count(workdir, train_csv, tiny_base):
    from condgen.training.finetune import finetune

    out = workdir / "resumable"
    first = finetune(tiny_config(train_csv, tiny_base, steps=4, save_steps=2), out)
    assert first.stats["optimizer_steps"] == 4
    resumed = finetune(tiny_config(train_csv, tiny_base, steps=8, save_steps=2), out, resume=True)
    assert resumed.stats["resumed_from"] == "checkpoint-4"
    assert resumed.stats["optimizer_steps"] == 8


def test_checkpoint_overfits_the_training_lines(checkpoint):
    info = json.loads((checkpoint / "condgen_training.json").read_text())
    assert info["stats"]["train_loss"] < 2.0


def test_export_writes_a_checked_bundle(bundle):
    manifest = read_manifest(bundle)
    assert manifest.onnx.parity_max_abs_diff < 1e-3
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


@pytest.mark.parametrize("variant", ["int8", "fp16"])
def test_lighter_variants_export_with_their_parity_figures(workdir, checkpoint, variant):
    import numpy as np

    from condgen.server.engine import Engine
    from condgen.training.export import export_bundle

    result = export_bundle(checkpoint, workdir / f"bundle-{variant}", variant=variant, min_top1=0.8)
    info = read_manifest(result.bundle_dir).onnx
    assert info.variant == variant and info.parity_top1_agreement >= 0.8
    assert info.dtype == ("float16" if variant == "fp16" else "float32")
    engine = Engine(result.bundle_dir, read_manifest(result.bundle_dir))
    batch = engine.new_batch(0, engine.encode("card_arrival,"))
    logits = engine.forward(batch)
    assert logits.shape == (1, engine.vocab_size) and np.isfinite(logits.astype(np.float32)).all()
