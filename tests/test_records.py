"""Record checks on hand-made cases: copies, lengths, echoes, duplicates, fidelity scoring."""

import random

import numpy as np
import pytest

from condgen.codec import normalize_for_match
from condgen.server.copy_index import CopyIndex, jaccard, shingles
from condgen.server.fidelity import FidelityScorer
from condgen.server.records import JudgeSettings, LengthBounds, RecordJudge

pytestmark = pytest.mark.fast

TRAIN = [
    "I am still waiting on my card?",
    "My card was stolen last night, help!",
    "What exchange rate do you use for euros?",
    "How do I top up with Apple Pay?",
]


def test_copy_index_finds_exact_and_near_copies_only():
    index = CopyIndex(TRAIN)
    assert index.closest("i am STILL waiting on my card") == 1.0  # folded case and punctuation
    assert index.is_copy("I am still waiting on my cards")  # one letter added at the end: J = 0.96
    assert not index.is_copy("I am still waiting on my new card from you?")
    assert not index.is_copy("Why was my transfer declined?")
    assert not index.is_copy("")


def test_prefix_filtering_misses_nothing_a_brute_force_finds():
    rng = random.Random(0)
    words = ["card", "my", "still", "waiting", "top", "up", "rate", "euro", "why", "help", "stolen", "pin"]
    corpus = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(300)]
    index = CopyIndex(corpus, threshold=0.6)
    sets = [shingles(normalize_for_match(t)) for t in corpus]
    for _ in range(200):
        query = " ".join(rng.choice(words) for _ in range(rng.randint(3, 9)))
        q = shingles(normalize_for_match(query))
        brute = max(jaccard(q, s) for s in sets)
        found = index.closest(query)
        if brute >= 0.6:
            assert found == pytest.approx(brute)
        else:
            assert found == 0.0


def test_length_bounds_from_training_stats():
    bounds = LengthBounds.from_stats({"min": 13, "max": 429, "p01": 20.0, "p99": 221.0})
    assert (bounds.low, bounds.high) == (10, 332)


def judge_with(scorer=None):
    return RecordJudge(",", LengthBounds(5, 60), CopyIndex(TRAIN), scorer)


@pytest.mark.parametrize(
    "line, reason",
    [
        ("no separator", "malformed"),
        ("other_intent,Where is my card?", "wrong_intent"),
        ("card_arrival,   ", "empty_text"),
        ("card_arrival,Hi?", "too_short"),
        ("card_arrival," + "very long " * 10, "too_long"),
        ("card_arrival,Shown in the prompt.", "prompt_echo"),
        ("card_arrival,Seen already!", "duplicate"),
        ("card_arrival,I am still waiting on my card!", "training_copy"),
    ],
)
def test_each_rejection_reason(line, reason):
    seen = {normalize_for_match("Seen already")}
    prompt = frozenset([normalize_for_match("Shown in the prompt")])
    verdict = judge_with().judge(line, "card_arrival", JudgeSettings(), seen, prompt)
    assert verdict.reason == reason


def test_switches_allow_copies_and_recent_duplicates():
    judge = judge_with()
    copy = "card_arrival,I am still waiting on my card!"
    allowed = JudgeSettings(allow_training_copies=True)
    assert judge.judge(copy, "card_arrival", allowed, set(), frozenset()).reason is None
    judge.remember("card_arrival", "Where is it?", set())
    line = "card_arrival,Where is it?"
    assert judge.judge(line, "card_arrival", JudgeSettings(), set(), frozenset()).reason == "duplicate"
    relaxed = JudgeSettings(avoid_recent_duplicates=False)
    assert judge.judge(line, "card_arrival", relaxed, set(), frozenset()).text == "Where is it?"


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    from condgen.training.fidelity import fit_classifier, save_classifier

    texts = [
        "where is my card",
        "card not arrived yet",
        "still waiting for card delivery",
        "my card was stolen",
        "I lost my card",
        "someone took my card",
        "exchange rate for euro",
        "what rate do you use",
        "currency conversion rate",
    ]
    labels = ["card_arrival"] * 3 + ["lost_or_stolen_card"] * 3 + ["exchange_rate"] * 3
    pipeline = fit_classifier(texts, labels)
    folder = tmp_path_factory.mktemp("fidelity")
    save_classifier(pipeline, folder)
    return pipeline, FidelityScorer.load(folder)


def test_fidelity_scorer_matches_scikit_learn(fitted):
    pipeline, scorer = fitted
    probe = [
        "Where is my new card??",
        "stolen card!",
        "Rate of the euro, please",
        "unrelated words entirely",
        "a",
        "Ünïcödé  spacing\tand\nlines",
    ]
    assert scorer.classes == list(pipeline.classes_)
    np.testing.assert_allclose(scorer.predict_proba(probe), pipeline.predict_proba(probe), atol=1e-5)


def test_low_fidelity_is_rejected(fitted):
    _, scorer = fitted
    judge = judge_with(scorer)
    good = judge.judge(
        "exchange_rate,what exchange rate do you use",
        "exchange_rate",
        JudgeSettings(min_fidelity=0.4),
        set(),
        frozenset(),
    )
    assert good.reason is None and good.fidelity >= 0.4 and good.predicted_intent == "exchange_rate"
    bad = judge.judge(
        "exchange_rate,my card was stolen today", "exchange_rate", JudgeSettings(min_fidelity=0.4), set(), frozenset()
    )
    assert bad.reason == "low_fidelity" and bad.predicted_intent == "lost_or_stolen_card"


def test_agreement_filter_drops_records_the_classifier_gives_to_another_intent(fitted):
    _, scorer = fitted
    judge = judge_with(scorer)
    agree = JudgeSettings(require_predicted_intent=True)
    line = "exchange_rate,my card was stolen today"
    assert judge.judge(line, "exchange_rate", JudgeSettings(), set(), frozenset()).reason is None
    assert judge.judge(line, "exchange_rate", agree, set(), frozenset()).reason == "low_fidelity"
    kept = judge.judge("exchange_rate,what rate do you use for euro", "exchange_rate", agree, set(), frozenset())
    assert kept.reason is None and kept.predicted_intent == "exchange_rate"


def test_every_rejection_reason_has_a_summary_counter():
    from condgen.server.records import REJECTION_REASONS
    from condgen.v1 import generator_pb2 as pb

    assert set(REJECTION_REASONS) == {f.name for f in pb.RejectionCounts.DESCRIPTOR.fields}


def _line_keeper_and_sequence(fake_bundle_dir, label_check: bool):
    from fake_engine import FakeEngine

    from condgen.bundle import read_examples, read_manifest
    from condgen.server.lines import LineKeeper, Sequence
    from condgen.server.requests import GenerationSpec, Job, RequestState

    engine = FakeEngine(read_manifest(fake_bundle_dir))
    judge = RecordJudge.for_bundle(fake_bundle_dir, engine.manifest, read_examples(fake_bundle_dir))
    keeper = LineKeeper(engine, judge)
    job = Job("card_arrival", 0, engine.encode("card_arrival,"), target=5)
    state = RequestState(1, GenerationSpec(("card_arrival",), 5, label_check=label_check), [job])
    seq = Sequence(0, state, job, np.random.default_rng(0), [])
    return keeper, engine, seq


def _write(keeper, engine, seq, text: str):
    """Force `card_arrival,TEXT\\n` through the keeper; what next_token gave for the line break."""
    seq.forced.clear()
    seq.forced.extend(engine.encode(f"card_arrival,{text}\n"))
    seq.line_tokens = []
    result = None
    while seq.forced:
        result = keeper.next_token(seq, None, 0)
    return result


def test_a_sequence_that_repeats_its_own_line_ends_there(fake_bundle_dir):
    from condgen.server.lines import Sequence

    keeper, engine, seq = _line_keeper_and_sequence(fake_bundle_dir, label_check=False)
    line = " where is my new card please"
    assert _write(keeper, engine, seq, line) is not None  # accepted: the sequence writes on
    assert seq.request.summary.records_accepted == 1
    # Another sequence of the job writing it: a duplicate, but that sequence is not looping.
    other = Sequence(1, seq.request, seq.job, np.random.default_rng(1), [])
    assert _write(keeper, engine, other, line) is not None
    assert seq.request.summary.rejected["duplicate"] == 1
    assert _write(keeper, engine, seq, line) is None  # its own line again: it loops, so it ends
    assert seq.request.summary.rejected["duplicate"] == 2


def test_a_line_refused_by_the_label_check_is_a_duplicate_when_written_again(fake_bundle_dir):
    keeper, engine, seq = _line_keeper_and_sequence(fake_bundle_dir, label_check=True)
    line = " how much is the exchange rate today"
    assert _write(keeper, engine, seq, line) is not None  # waits for the label check
    [pending] = keeper.take_pending()
    keeper.settle([pending], [-1.0])  # below the request's margin (0): refused
    assert seq.request.summary.rejected["label_check"] == 1
    assert _write(keeper, engine, seq, line) is None  # not scored again: a duplicate, and the end
    assert seq.request.summary.rejected["duplicate"] == 1 and not keeper.take_pending()
