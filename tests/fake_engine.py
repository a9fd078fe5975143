"""A deterministic stand-in for `condgen.server.engine.Engine`, for the fast test layer.

It has the real engine's surface (`encode`, `decode`, `prefill`, `forward`, `score`,
`newline_tokens`, `manifest`, `can_score`, `provider`) and drives the real `Batch`: its cache is
one layer of one head of width one that holds each position's token id, so the fake "model"
reads a row's history from its cache (padding included) exactly as the scheduler left it after
every fork, join and leave. Nothing here needs torch, transformers, ONNX Runtime or a model.

The toy language model: tokens are words (with their leading space), `,`, `\\n` and EOS. After
the `intent,` of a line it writes 3 to 6 words, then a line break. Its words are drawn from a
shared word list and from the pieces of the current line's intent name (`card_arrival` ->
"card", "arrival"), which it favours. Logits are a pure function of the row's history, so
sampling with the same seed gives the same records whatever the batch, as with the real engine.
The label check works too: a text with the words of intent A scores higher after `A,` than
after `B,`.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np

from condgen.bundle import EXAMPLES_NAME, Manifest, OnnxInfo, write_manifest
from condgen.server.batch import Batch
from condgen.server.sampling import TokenWindows

EOS, NEWLINE, COMMA = 0, 1, 2
VOCAB = 2048
WORDS = (
    "my",
    "the",
    "card",
    "please",
    "when",
    "will",
    "where",
    "is",
    "how",
    "can",
    "i",
    "get",
    "a",
    "new",
    "money",
    "help",
    "why",
    "did",
    "it",
    "not",
    "arrive",
    "yet",
    "account",
    "today",
    "still",
    "need",
    "urgent",
    "tell",
    "me",
    "about",
    "fee",
    "rate",
    "transfer",
    "app",
    "phone",
    "week",
)
PIECE = re.compile(r"\n|,| ?[^\s,]+")
INTENT_BOOST = 2.5


def fake_bundle(folder: Path, examples: dict[str, list[str]]) -> Path:
    """A bundle folder with a manifest and examples but no graph (for `FakeEngine`)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / EXAMPLES_NAME).write_text(json.dumps(examples))
    info = OnnxInfo(
        file="fake.onnx",
        inputs=[],
        outputs=[],
        past_key_names=["past.0"],
        present_key_names=["present.0"],
        num_layers=1,
        num_kv_heads=1,
        head_dim=1,
        variant="fake",
    )
    lengths = [len(t) for texts in examples.values() for t in texts]
    manifest = Manifest(
        base_model="fake",
        separator=",",
        intents={i: len(t) for i, t in examples.items()},
        onnx=info,
        eos_token_id=EOS,
        text_length={"min": min(lengths), "max": max(lengths), "p01": min(lengths), "p99": max(lengths)},
    )
    write_manifest(folder, manifest)
    return folder


class FakeEngine:
    """A toy word-level language model behind the engine's interface."""

    provider = "FakeExecutionProvider"
    runtime = "fake"
    device_type = "cpu"
    cache_bytes_per_token = 8  # one float key and one float value per token

    def free_device_bytes(self) -> None:
        return None  # the CPU: no device memory to size a budget from

    can_score = True

    def __init__(self, manifest: Manifest, fail_after_steps: int | None = None):
        self.manifest = manifest
        self.info = manifest.onnx
        self.vocab_size = VOCAB
        self._ids: dict[str, int] = {"\n": NEWLINE, ",": COMMA}
        self._pieces: list[str] = ["", "\n", ","]
        self.words = [self._id(" " + w) for w in WORDS]  # inside a text
        self.first_words = [self._id(w) for w in WORDS]  # right after `intent,`
        self.newline_tokens = np.zeros(VOCAB, dtype=bool)
        self.newline_tokens[NEWLINE] = True
        self.passes = 0
        self.fail_after_steps = fail_after_steps  # raise in `forward` after this many passes (fault tests)

    # ---- tokenizer -----------------------------------------------------------------
    def _id(self, piece: str) -> int:
        if piece not in self._ids:
            if len(self._pieces) >= VOCAB:
                raise ValueError("the fake engine's vocabulary is full")
            self._ids[piece] = len(self._pieces)
            self._pieces.append(piece)
        return self._ids[piece]

    def encode(self, text: str) -> list[int]:
        return [self._id(piece) for piece in PIECE.findall(text)]

    def decode(self, token_ids: list[int]) -> str:
        return "".join(self._pieces[t] for t in token_ids)

    # ---- the toy model -------------------------------------------------------------
    def _intent_words(self, intent_token: int, first: bool) -> list[int]:
        name = self._pieces[intent_token].strip()
        return [self._id(part if first else " " + part) for part in name.split("_") if part]

    def _next_logits(self, history: list[int]) -> np.ndarray:
        """Logits after `history`: words of the line's intent favoured, a line break after a
        number of words fixed by the history."""
        logits = np.full(VOCAB, -30.0, dtype=np.float32)
        if COMMA not in history:
            logits[self.words] = 0.0
            return logits
        line_start = len(history) - history[::-1].index(NEWLINE) if NEWLINE in history else 0
        line = history[line_start:]
        if COMMA not in line:  # a line's intent position: after the prompt, the scheduler forces it
            logits[self.words] = 0.0
            return logits
        written = len(line) - line.index(COMMA) - 1
        # Keyed on text, not ids: ids are handed out in the order pieces are first seen.
        digest = hashlib.blake2b(self.decode(history[-4:]).encode(), digest_size=8).digest()
        noise = np.random.default_rng(int.from_bytes(digest, "little")).random(len(self.words)).astype(np.float32)
        words = self.first_words if written == 0 else self.words
        logits[words] = noise
        logits[self._intent_words(line[0], written == 0)] += INTENT_BOOST
        if written >= 3 + digest[0] % 4:
            logits[NEWLINE] = 6.0
        return logits

    @staticmethod
    def _histories(batch: Batch) -> list[list[int]]:
        """Each row's real tokens: its cache (where the mask says real) then its next tokens."""
        past = next(iter(batch.past.values()))[:, 0, : batch.past_len, 0]  # (rows, past_len)
        new_mask = batch.next_mask if batch.next_mask is not None else np.ones(batch.next_ids.shape, dtype=np.int64)
        rows = []
        for row in range(len(batch)):
            cached = [int(t) for t, m in zip(past[row], batch.past_mask[row]) if m]
            rows.append(cached + [int(t) for t, m in zip(batch.next_ids[row], new_mask[row]) if m])
        return rows

    def forward(self, batch: Batch) -> np.ndarray:
        """One pass: the cache takes the fed tokens; the logits follow each row's history."""
        self.passes += 1
        if self.fail_after_steps is not None and self.passes > self.fail_after_steps:
            raise RuntimeError("fake engine failure (injected)")
        histories = self._histories(batch)
        new = batch.next_ids.astype(np.float32)[:, None, :, None]  # (rows, heads=1, new_len, dim=1)
        batch.advance(
            {
                name: np.concatenate([batch.past[name][:, :, : batch.past_len], new], axis=2)
                for name in self.info.past_key_names
            }
        )
        return np.stack([self._next_logits(h) for h in histories])

    def step(self, batch: Batch, temperatures: np.ndarray) -> TokenWindows:
        """One pass, as the real engine's sampling path sees it (windows computed on the host)."""
        return TokenWindows.from_logits(self.forward(batch), temperatures)

    def prefill(
        self, seq_ids: list[int], prompts: list[list[int]], max_tokens: int = 1024
    ) -> list[tuple[Batch, np.ndarray]]:
        batch = Batch.for_prompts(seq_ids, prompts, self.info.past_key_names, 1, 1)
        logits = self.forward(batch)
        return [(batch.filter([seq_id]), logits[row]) for row, seq_id in enumerate(seq_ids)]

    def score(self, contexts: list[list[int]], continuations: list[list[int]], max_tokens: int = 1024) -> np.ndarray:
        """Mean log-probability per token of each continuation after its context."""
        means = np.zeros(len(contexts))
        for row, (context, continuation) in enumerate(zip(contexts, continuations)):
            history, total = list(context), 0.0
            for token in continuation:
                logits = self._next_logits(history).astype(np.float64)
                top = logits.max()
                total += logits[token] - (top + np.log(np.exp(logits - top).sum()))
                history.append(token)
            means[row] = total / max(1, len(continuation))
        return means
