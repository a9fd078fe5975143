"""The sentence encoder loader and the downstream classifiers of `condgen evaluate`: the real
all-MiniLM-L6-v2 from its wheel, a real logistic regression, no mocks."""

import numpy as np
import pytest

from condgen.training.classifiers import CLASSIFIERS, fit_intent_classifier
from condgen.training.encoder import DEFAULT_ENCODER, EmbeddingCache, EncoderError, encoder_location, load_encoder

ROWS = [
    ("card_arrival", "when will my new card arrive"),
    ("card_arrival", "my card still has not come in the post"),
    ("card_arrival", "how long does card delivery take"),
    ("exchange_rate", "what exchange rate do you use for euros"),
    ("exchange_rate", "how much is one dollar in pounds today"),
    ("exchange_rate", "is your currency conversion rate fair"),
]


@pytest.fixture(scope="module")
def embed():
    return EmbeddingCache.load()


def test_the_default_encoder_loads_offline_from_its_wheel():
    location = encoder_location(DEFAULT_ENCODER)
    assert location.endswith("model") and encoder_location("sentence-transformers/all-MiniLM-L6-v2") == location


def test_an_unknown_encoder_is_a_one_line_error(tmp_path):
    with pytest.raises(EncoderError, match="cannot load sentence encoder"):
        load_encoder(str(tmp_path / "no-such-encoder"))


def test_embeddings_are_unit_length_and_each_text_is_encoded_once(embed):
    calls = []
    encode = embed.encoder.encode
    embed.encoder.encode = lambda texts, **kw: calls.append(list(texts)) or encode(texts, **kw)
    try:
        first = embed(["when will my card arrive", "exchange rate please"])
        again = embed(["exchange rate please", "when will my card arrive", "exchange rate please"])
    finally:
        embed.encoder.encode = encode
    assert first.shape == (2, 384) and np.allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(again[1], first[0]) and calls == [["when will my card arrive", "exchange rate please"]]


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_each_classifier_learns_unseen_paraphrases(name, embed):
    texts, labels = [t for _, t in ROWS], [i for i, _ in ROWS]
    model = fit_intent_classifier(name, texts, labels, balanced=True, embed=embed)
    predicted = model.predict(["my card has not arrived yet", "what rate will I get converting dollars"])
    assert list(predicted) == ["card_arrival", "exchange_rate"]
    assert model.predict_proba(texts).shape == (len(texts), 2)


def test_an_unknown_classifier_is_refused(embed):
    with pytest.raises(ValueError, match="is not one of embedding, tfidf"):
        fit_intent_classifier("bert", ["a"], ["x"], embed=embed)


def test_large_sets_are_read_back_from_disk_instead_of_encoded_again(embed, tmp_path):
    texts = [f"when will card number {i} arrive" for i in range(12)]
    first = EmbeddingCache(embed.encoder, store=tmp_path, key="test")
    first.min_stored = 10
    vectors = first(texts)
    assert len(list(tmp_path.glob("*.npy"))) == 1
    again = EmbeddingCache(embed.encoder, store=tmp_path, key="test")
    again.min_stored = 10
    calls = []
    encode = embed.encoder.encode
    embed.encoder.encode = lambda texts, **kw: calls.append(list(texts)) or encode(texts, **kw)
    try:
        assert np.array_equal(again(texts), vectors) and calls == []
        other = EmbeddingCache(embed.encoder, store=tmp_path, key="another encoder")
        other.min_stored = 10
        other(texts)  # another encoder's key never reads this one's vectors
        assert len(calls) == 1
        small = EmbeddingCache(embed.encoder, store=tmp_path, key="test")
        small(texts[:3])  # under min_stored: memory only
        assert len(list(tmp_path.glob("*.npy"))) == 2
    finally:
        embed.encoder.encode = encode
