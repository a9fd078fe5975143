"""examples/banking77.ipynb runs top to bottom (tiny model), so it never goes stale; and the
Python API it uses (condgen.train / export / serve) works on a DataFrame."""

import csv
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import BANKING77_TRAIN, ROOT

NOTEBOOK = ROOT / "examples" / "banking77.ipynb"
INTENTS = ["card_arrival", "lost_or_stolen_card", "exchange_rate", "top_up_failed", "pin_blocked"]


def small_split(folder: Path, per_intent: int = 15) -> Path:
    """train.csv / test.csv with a few short rows of the notebook's intents."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("train.csv", "test.csv"):
        with open(BANKING77_TRAIN.with_name(name), newline="", encoding="utf-8") as handle:
            rows = [r for r in csv.DictReader(handle) if r["category"] in INTENTS and len(r["text"]) < 60]
        taken, kept = Counter(), []
        for row in rows:
            if taken[row["category"]] < per_intent:
                taken[row["category"]] += 1
                kept.append(row)
        with open(folder / name, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=["text", "category"])
            writer.writeheader()
            writer.writerows({"text": r["text"], "category": r["category"]} for r in kept)
    return folder


def test_the_notebook_runs_top_to_bottom_with_the_tiny_model(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    parameters = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    data = small_split(tmp_path / "data")
    parameters.source += f"\nDATA_DIR = {str(data)!r}\nQUICK = True\nSTEPS = 40\nROWS_PER_INTENT = 2\n"
    NotebookClient(
        notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()
    text = "\n".join(
        str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
        for cell in notebook.cells
        if cell.cell_type == "code"
        for o in cell.outputs
    )
    assert "serving on 127.0.0.1:" in text and "on-label overall:" in text and "wrote 10 rows" in text
    assert not any(o.get("output_type") == "error" for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    assert not any(c.outputs for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code"), (
        "commit the notebook without outputs"
    )


def test_the_python_api_trains_exports_and_serves_from_a_dataframe(tmp_path, train_csv, tiny_base):
    import pandas as pd

    import condgen

    frame = pd.read_csv(train_csv)
    checkpoint = condgen.train(
        frame,
        tmp_path / "ckpt",
        config={"steps": 30, "batch_size": 4, "max_tokens": 64, "learning_rate": 5e-3, "validation_fraction": 0.0},
        base_model=str(tiny_base),
    )
    assert (checkpoint / "training_data.csv").is_file()
    bundle = condgen.export(checkpoint, tmp_path / "bundle")
    with condgen.serve(bundle) as server:
        assert set(server.list_intents()) == set(frame["category"])
        rows = server.generate_df(["card_arrival"], 2, seed=1, allow_training_copies=True, label_check=False)
        port = server.port
    assert list(rows["intent"]) == ["card_arrival"] * 2 and port > 0
    assert condgen.training_config({"models": [{"gpt_x": {"learning_rate": "5e-6"}}]}).learning_rate == 5e-6
    assert condgen.training_config({"steps": 7}, seed=3).steps == 7
