"""Rows a user can trust: the label check, request-supplied examples, reproducible seeded requests.

Real server on a loopback port over the tiny overfit bundle; the label check's scores come
from the real engine.
"""

import math

import grpc
import pytest

from condgen.bundle import read_examples, read_manifest
from condgen.client import GenerateError, IncompleteError
from condgen.client.frames import read_examples_csv
from condgen.codec import normalize_for_match
from condgen.server.engine import Engine
from condgen.server.errors import RequestError
from condgen.server.fidelity import FidelityScorer
from condgen.server.label_check import LabelChecker, LineToCheck
from condgen.server.limits import Defaults, LabelCheckConfig, Limits
from condgen.server.validation import to_spec
from condgen.v1 import generator_pb2 as pb

BASE = dict(temperature=1.0, max_new_tokens=48, num_prompt_examples=4, allow_training_copies=True)
NEW_INTENT = "crypto_refund"
NEW_TEXTS = [
    "Can I get a refund on my crypto purchase?",
    "I want my bitcoin money back",
    "How do I reverse a crypto payment?",
    "Refund the ethereum I bought yesterday",
    "my crypto purchase was a mistake, refund it",
]


@pytest.fixture(scope="module")
def checker(bundle):
    engine = Engine(bundle, read_manifest(bundle))
    return LabelChecker(engine, FidelityScorer.load(bundle), read_examples(bundle), ",", LabelCheckConfig(rivals=2))


# ---- reproducibility -----------------------------------------------------------------------


def test_a_seeded_request_repeated_gives_the_same_records(client):
    first = list(client.generate(["exchange_rate", "card_arrival"], 3, seed=21, **BASE))
    second = list(client.generate(["exchange_rate", "card_arrival"], 3, seed=21, **BASE))
    assert len(first) == 6 and first == second


def test_an_unseeded_request_repeated_gets_no_repeats(client):
    settings = {**BASE, "max_rounds": 8}
    first = {normalize_for_match(r.text) for r in client.generate(["lost_or_stolen_card"], 3, **settings)}
    second = {normalize_for_match(r.text) for r in client.generate(["lost_or_stolen_card"], 3, **settings)}
    assert first and not first & second
    # Asked explicitly, a seeded request also avoids the server's recent output.
    third = list(client.generate(["lost_or_stolen_card"], 2, seed=1, avoid_recent_duplicates=True, **settings))
    assert not {normalize_for_match(r.text) for r in third} & (first | second)


# ---- the label check -----------------------------------------------------------------------


def test_a_text_the_model_prefers_for_another_intent_gets_a_negative_margin(checker, train_records):
    stolen = next(r.text for r in train_records if r.intent == "lost_or_stolen_card")
    wrong, right = checker.margins([LineToCheck(stolen, "card_arrival"), LineToCheck(stolen, "lost_or_stolen_card")])
    assert wrong < 0 < right


def test_rivals_are_the_classifier_top_other_intents_and_the_request_new_ones(checker, train_records):
    text = next(r.text for r in train_records if r.intent == "exchange_rate")
    line = LineToCheck(text, "exchange_rate", {NEW_INTENT: tuple(NEW_TEXTS)})
    (rivals,) = checker.rivals([line])
    assert "exchange_rate" not in rivals and len(rivals) == 3 and rivals[-1] == NEW_INTENT


def test_lines_the_model_gives_to_another_intent_are_rejected_and_counted(client):
    strict = []
    with pytest.raises(IncompleteError) as incomplete:
        strict.extend(
            client.generate(["card_arrival"], 2, seed=4, label_check=True, label_margin=50.0, max_rounds=3, **BASE)
        )
    summary = client.last_summary
    assert strict == [] and not summary.complete and incomplete.value.missing == {"card_arrival": 2}
    assert summary.rejected.label_check > 0 and summary.rounds == 3 * (1 + client.retry.max_attempts)
    lenient = list(
        client.generate(["card_arrival", "exchange_rate"], 3, seed=4, label_check=True, label_margin=-50.0, **BASE)
    )
    assert len(lenient) == 6 and all(math.isfinite(r.label_margin) for r in lenient)
    assert client.last_summary.rejected.label_check == 0


def test_record_margins_are_the_checkers_own(client, checker):
    records = list(
        client.generate(
            ["card_arrival", "lost_or_stolen_card"], 3, seed=9, label_check=True, label_margin=-50.0, **BASE
        )
    )
    served = LabelChecker(checker.engine, checker.scorer, checker.examples, ",", LabelCheckConfig())  # serve's
    expected = served.margins([LineToCheck(r.text, r.intent) for r in records])
    assert [r.label_margin for r in records] == pytest.approx(expected, abs=1e-3)
    kept = list(
        client.generate(
            ["card_arrival", "lost_or_stolen_card"],
            3,
            seed=9,
            label_check=True,
            label_margin=0.0,
            max_rounds=12,
            **BASE,
        )
    )
    assert all(r.label_margin >= 0.0 for r in kept)


def test_without_the_label_check_margins_are_nan(client):
    records = list(client.generate(["exchange_rate"], 2, seed=2, label_check=False, **BASE))
    assert records and all(math.isnan(r.label_margin) for r in records)


# ---- request-supplied examples -------------------------------------------------------------


def test_a_new_intent_is_served_from_request_examples(client):
    frame, summary = client.generate_df(
        [NEW_INTENT, "card_arrival"],
        3,
        return_summary=True,
        seed=5,
        examples={NEW_INTENT: NEW_TEXTS},
        label_check=False,
        **BASE,
    )
    assert frame["intent"].value_counts().to_dict() == {NEW_INTENT: 3, "card_arrival": 3}
    assert summary.complete


def test_copies_of_request_examples_are_rejected(client):
    # The examples of a known intent replace the bundle's in its prompts; the tiny model,
    # shown only these, recites them: every copy is rejected, none is streamed.
    texts = ["I am still waiting on my card", "my card has not arrived yet"]
    records = list(
        client.generate(
            ["card_arrival"],
            2,
            seed=3,
            examples={"card_arrival": texts},
            label_check=False,
            max_rounds=4,
            **{**BASE, "allow_training_copies": False},
        )
    )
    assert not {normalize_for_match(r.text) for r in records} & {normalize_for_match(t) for t in texts}


def request_with(examples, intents=("card_arrival", NEW_INTENT)):
    return pb.GenerateRequest(
        intents=list(intents), num_records=1, examples=[pb.IntentExamples(intent=k, texts=v) for k, v in examples]
    )


SMALL = Limits(max_examples_per_intent=3, max_example_chars=40, max_request_bytes=500)


@pytest.mark.parametrize(
    "examples, intents, message",
    [
        ([], ("card_arrival", NEW_INTENT), "unknown intent 'crypto_refund'.*bring examples"),
        ([("other_intent", ["a text"])], ("card_arrival",), "not in `intents`; add it there"),
        ([(NEW_INTENT, ["a"]), (NEW_INTENT, ["b"])], ("card_arrival", NEW_INTENT), "twice"),
        ([("bad,name", ["a"])], ("bad,name",), "separator"),
        ([(" padded", ["a"])], (" padded",), "spaces at its ends"),
        ([(NEW_INTENT, [])], ("card_arrival", NEW_INTENT), "no texts"),
        ([(NEW_INTENT, ["a", "b", "c", "d"])], ("card_arrival", NEW_INTENT), "4 texts; the limit is 3"),
        ([(NEW_INTENT, ["one\ntwo"])], ("card_arrival", NEW_INTENT), "line break"),
        ([(NEW_INTENT, ["   "])], ("card_arrival", NEW_INTENT), "is empty"),
        ([(NEW_INTENT, ["x" * 41])], ("card_arrival", NEW_INTENT), "41 characters; the limit is 40"),
        (
            [(NEW_INTENT, ["x" * 40] * 3), ("b", ["y" * 40] * 3), ("c", ["z" * 40] * 3), ("d", ["w" * 40] * 3)],
            (NEW_INTENT, "b", "c", "d"),
            "bytes; the limit is 500",
        ),
    ],
)
def test_bad_examples_are_refused_saying_how_to_fix_them(bundle, examples, intents, message):
    known = read_manifest(bundle).intents
    with pytest.raises(RequestError, match=message):
        to_spec(request_with(examples, intents), known, SMALL, Defaults(), 32)


def test_valid_examples_reach_the_spec(bundle):
    spec = to_spec(
        request_with([(NEW_INTENT, [" a text ", "another"])]), read_manifest(bundle).intents, SMALL, Defaults(), 32
    )
    assert spec.examples == {NEW_INTENT: ("a text", "another")} and spec.intents == ("card_arrival", NEW_INTENT)


def test_seed_decides_the_recent_output_default(bundle):
    known = read_manifest(bundle).intents
    seeded = pb.GenerateRequest(intents=["card_arrival"], num_records=1, sampling=pb.SamplingParams(seed=1))
    unseeded = pb.GenerateRequest(intents=["card_arrival"], num_records=1)
    assert not to_spec(seeded, known, Limits(), Defaults(), 32).avoid_recent_duplicates
    assert to_spec(unseeded, known, Limits(), Defaults(), 32).avoid_recent_duplicates


def test_bad_examples_get_invalid_argument_and_the_server_stays_up(client):
    with pytest.raises(GenerateError) as caught:
        list(client.generate(["card_arrival"], 1, examples={NEW_INTENT: NEW_TEXTS}, **BASE))
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and "add it there" in caught.value.details
    assert len(list(client.generate(["card_arrival"], 1, seed=1, **BASE))) == 1


def test_examples_csv_for_generate(tmp_path):
    path = tmp_path / "new.csv"
    path.write_text('text,category\n"Refund my crypto, please",crypto_refund\nbitcoin back?,crypto_refund\n')
    assert read_examples_csv(path) == {"crypto_refund": ["Refund my crypto, please", "bitcoin back?"]}
    (tmp_path / "bad.csv").write_text("sentence,intent\nx,y\n")
    with pytest.raises(ValueError, match="need a `text` column"):
        read_examples_csv(tmp_path / "bad.csv")


def test_the_judge_checks_copies_of_request_examples():
    from condgen.server.copy_index import CopyIndex
    from condgen.server.records import JudgeSettings, LengthBounds, RecordJudge

    judge = RecordJudge(",", LengthBounds(), CopyIndex(["a bundle text"]), None)
    supplied = CopyIndex(NEW_TEXTS)
    copy = judge.judge(
        f"{NEW_INTENT},I want my Bitcoin money back!", NEW_INTENT, JudgeSettings(), set(), frozenset(), supplied
    )
    fresh = judge.judge(
        f"{NEW_INTENT},where is my crypto refund", NEW_INTENT, JudgeSettings(), set(), frozenset(), supplied
    )
    assert copy.reason == "training_copy" and fresh.reason is None


def test_a_retry_sends_the_missing_intents_examples_as_prompts_and_the_others_as_rivals():
    from condgen.client.client import build_request
    from condgen.client.resume import Progress

    progress = Progress(
        build_request(
            [NEW_INTENT, "card_arrival"], 2, seed=1, examples={NEW_INTENT: NEW_TEXTS, "card_arrival": ["my card?"]}
        )
    )
    for index in range(2):
        progress.accept(pb.Record(intent=NEW_INTENT, text=f"text {index}"))
    (retry,) = progress.next_requests()
    assert list(retry.intents) == ["card_arrival"]
    assert [e.intent for e in retry.examples] == ["card_arrival"]
    # the complete intent's examples stay the label check's rivals
    assert [(e.intent, list(e.texts)) for e in retry.rival_examples] == [(NEW_INTENT, NEW_TEXTS)]


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--label-rivals", "0", "rivals must be at least 1"),
        ("--label-context-examples", "-1", "must not be negative"),
        ("--label-tokens-per-pass", "10", "max_tokens_per_pass must be at least 64"),
        ("--context-cache-tokens", "-1", "give 0 (no cache) or more"),
    ],
)
def test_serve_refuses_bad_label_check_flags_in_one_line(tmp_path, capsys, flag, value, message):
    from condgen.cli import main

    assert main(["serve", "--bundle", str(tmp_path), flag, value]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_lines_with_a_request_supplied_candidate_are_scored_after_examples(checker):
    bare = LabelChecker(
        checker.engine, checker.scorer, checker.examples, ",", LabelCheckConfig(rivals=2, supplied_context_examples=0)
    )
    shown = LabelChecker(
        checker.engine, checker.scorer, checker.examples, ",", LabelCheckConfig(rivals=2, supplied_context_examples=2)
    )
    new_line = LineToCheck("I want my bitcoin back", NEW_INTENT, {NEW_INTENT: tuple(NEW_TEXTS)})
    known_line = LineToCheck("I lost my card", "lost_or_stolen_card")
    assert bare.margins([known_line]) == pytest.approx(shown.margins([known_line]))
    assert bare.margins([new_line])[0] != pytest.approx(shown.margins([new_line])[0], abs=1e-4)
    assert shown._context(NEW_INTENT, new_line.supplied, 2) == checker.engine.encode(
        "".join(f"{NEW_INTENT},{t}\n" for t in NEW_TEXTS[:2]) + f"{NEW_INTENT},"
    )
