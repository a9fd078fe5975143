"""Shared fixtures: a tiny model overfit on a few banking77 records, its bundle, a live server.

Everything is built once per test session in a temporary folder: a BPE tokenizer and a
2-layer Llama (seconds on a CPU), fine-tuned with the real `finetune`, exported with the
real `export_bundle`, served by the real gRPC server on a free loopback port.
"""

from __future__ import annotations

import csv
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What the code keeps on disk between runs (large sets' sentence embeddings) goes to a temporary
# folder during the tests, not the user's cache.
os.environ.setdefault("CONDGEN_CACHE_DIR", tempfile.mkdtemp(prefix="condgen-cache-"))


def _shared_data() -> Path:
    """The shared data folder: $CONDGEN_SHARED_DATA, else ../shared/data beside the checkout, else
    beside the checkout this one was cloned from (a local clone made elsewhere, say in /tmp)."""
    if os.environ.get("CONDGEN_SHARED_DATA"):
        return Path(os.environ["CONDGEN_SHARED_DATA"])
    beside = ROOT.parent / "shared" / "data"
    if beside.is_dir():
        return beside
    origin = subprocess.run(
        ["git", "-C", str(ROOT), "config", "--get", "remote.origin.url"], capture_output=True, text=True
    ).stdout.strip()
    if origin and Path(origin).is_dir():
        return Path(origin).resolve().parent / "shared" / "data"
    return beside


BANKING77_TRAIN = _shared_data() / "banking77" / "train.csv"
TEST_INTENTS = ("card_arrival", "lost_or_stolen_card", "exchange_rate")
EXAMPLES_PER_INTENT = 6


def _short_examples(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(
            f"the tests read banking77 from {path}: put ../shared/data beside the checkout or set CONDGEN_SHARED_DATA"
        )
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    picked = []
    for intent in TEST_INTENTS:
        texts = sorted({r["text"] for r in rows if r["category"] == intent and 15 <= len(r["text"]) <= 45})
        picked += [{"text": t, "category": intent} for t in texts[:EXAMPLES_PER_INTENT]]
    return picked


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("condgen")


@pytest.fixture(scope="session")
def train_csv(workdir) -> Path:
    """A banking77-shaped CSV (columns text,category) with a few short examples of 3 intents."""
    path = workdir / "train.csv"
    rows = _short_examples(BANKING77_TRAIN)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "category"])
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="session")
def train_records(train_csv):
    from condgen.training.data import load_records

    return load_records(str(train_csv))


@pytest.fixture(scope="session")
def tiny_base(workdir, train_records) -> Path:
    from condgen.training.data import encode_lines
    from condgen.training.tiny import build_tiny_base_model

    return build_tiny_base_model(encode_lines(train_records), workdir / "tiny-base", vocab_size=400)


def tiny_config(train_csv: Path, tiny_base: Path, **overrides):
    from condgen.training.config import TrainingConfig

    settings = dict(
        data_source=str(train_csv),
        pretrained_model=str(tiny_base),
        steps=250,
        batch_size=4,
        max_tokens=64,
        learning_rate=5e-3,
        warmup_steps=10,
        lr_scheduler="linear",
        weight_decay=0.0,
        validation_fraction=0.0,
        eval_steps=1000,
        save_steps=1000,
        logging_steps=50,
        seed=0,
    )
    settings.update(overrides)
    return TrainingConfig(**settings)


@pytest.fixture(scope="session")
def checkpoint(workdir, train_csv, tiny_base) -> Path:
    """The tiny model overfit on the training lines, so greedy output is parseable."""
    from condgen.training.finetune import finetune

    return finetune(tiny_config(train_csv, tiny_base), workdir / "checkpoint").output_dir


@pytest.fixture(scope="session")
def bundle(workdir, checkpoint) -> Path:
    from condgen.training.export import export_bundle

    return export_bundle(checkpoint, workdir / "bundle").bundle_dir


@pytest.fixture(scope="session")
def whole_cache_bundle(workdir, checkpoint) -> Path:
    """The same model with a graph that returns the whole cache (as for GPUs: IO binding)."""
    from condgen.training.export import export_bundle

    return export_bundle(checkpoint, workdir / "bundle-whole-cache", cache="whole").bundle_dir


@pytest.fixture(scope="session")
def append_bundle(workdir, checkpoint) -> Path:
    """The same model with the append-only, left-padded cache (the default before ragged attention)."""
    from condgen.training.export import export_bundle

    return export_bundle(checkpoint, workdir / "bundle-append", cache="append").bundle_dir


class ServerThread:
    """A real condgen gRPC server on 127.0.0.1:<free port> in its own event loop thread
    (`condgen.api.LocalServer`, which the notebook API uses too)."""

    def __init__(self, config):
        self.config = config
        self.local = None

    def start(self) -> ServerThread:
        from condgen.api import LocalServer

        self.local = LocalServer(self.config)
        return self

    @property
    def running(self):
        return self.local.running

    @property
    def port(self) -> int:
        return self.local.port

    @property
    def target(self) -> str:
        return self.local.target

    def stop(self) -> None:
        self.local.stop()


def serve_config(bundle: Path, **overrides):
    from condgen.server.app import ServeConfig

    return ServeConfig(bundle=bundle, port=0, grace_seconds=5.0, **overrides)


@pytest.fixture(scope="session")
def server(bundle):
    thread = ServerThread(serve_config(bundle)).start()
    yield thread
    thread.stop()


@pytest.fixture()
def client(server):
    from condgen.client import Client

    with Client(server.target, timeout=120) as c:
        yield c


# ---- the fast layer: a fake engine over a bundle folder without a graph (tests/fake_engine.py) ----
FAKE_EXAMPLES = {
    "card_arrival": ["when will my card arrive", "my card has not arrived yet", "where is my new card"],
    "exchange_rate": ["what is the exchange rate today", "how do you set the exchange rate", "is the rate fair"],
    "lost_or_stolen_card": ["i lost my card", "my card was stolen yesterday", "someone took my card"],
}


@pytest.fixture(scope="session")
def fake_bundle_dir(tmp_path_factory) -> Path:
    from fake_engine import fake_bundle

    return fake_bundle(tmp_path_factory.mktemp("fake") / "bundle", FAKE_EXAMPLES)
