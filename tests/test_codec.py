"""The record codec: commas, newlines, unicode and bad labels."""

import pytest

from condgen.codec import (
    CodecError,
    LabelledText,
    decode_line,
    encode_line,
    encode_records,
    fold_text,
    normalize_for_match,
)

pytestmark = pytest.mark.fast


def test_commas_in_text_survive_a_round_trip():
    line = encode_line("transfer_fee", "Hi, why was I charged, twice, for this?")
    assert line == "transfer_fee,Hi, why was I charged, twice, for this?"
    assert decode_line(line) == LabelledText("transfer_fee", "Hi, why was I charged, twice, for this?")


def test_embedded_newlines_and_tabs_are_folded():
    line = encode_line("card_arrival", "Where is\nmy card?\r\n\tStill  waiting ")
    assert "\n" not in line and "\r" not in line
    assert decode_line(line).text == "Where is my card? Still waiting"


def test_unicode_is_kept():
    line = encode_line("exchange_rate", "Taux de change € → ¥ ? 為替レート")
    assert decode_line(line).text == "Taux de change € → ¥ ? 為替レート"


@pytest.mark.parametrize("label", ["a,b", "", "   ", "two\nlines"])
def test_bad_labels_are_rejected_with_a_reason(label):
    with pytest.raises(CodecError) as info:
        encode_line(label, "text")
    assert any(word in str(info.value) for word in ("separator", "empty", "line break"))


def test_other_separator():
    line = encode_line("a,b", "x|y", separator="|")
    assert line == "a,b|x|y"
    assert decode_line(line, separator="|") == LabelledText("a,b", "x|y")


def test_decode_rejects_lines_without_separator_or_intent():
    with pytest.raises(CodecError, match="separator"):
        decode_line("no separator here")
    with pytest.raises(CodecError, match="empty intent"):
        decode_line(",text only")


def test_decode_allows_empty_text_and_trims():
    assert decode_line("  card_arrival ,  ") == LabelledText("card_arrival", "")


def test_encode_records_one_line_each():
    text = encode_records([("a", "x, y"), ("b", "z\nw")])
    assert text == "a,x, y\nb,z w\n"


def test_fold_and_normalize():
    assert fold_text("  a \n\n b ") == "a b"
    assert normalize_for_match("Where's MY card?!") == normalize_for_match("where s my card")
