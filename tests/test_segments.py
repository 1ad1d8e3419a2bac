"""SMS segments (GSM 03.38 and UCS-2), smart encoding and the reply budget: segments.py, pure."""

import pytest
from hypothesis import given, settings, strategies as st

from smsbatch import segments
from smsbatch.segments import GSM7, UCS2, count, fit, smart_encode

EMOJI = "\U0001F600"  # outside the BMP: two UTF-16 code units


@pytest.mark.parametrize("text, encoding, n", [
    ("", GSM7, 1),
    ("a" * 160, GSM7, 1),
    ("a" * 161, GSM7, 2),
    ("a" * 153 * 2, GSM7, 2),
    ("a" * (306 + 1), GSM7, 3),
    ("a" * 158 + "€", GSM7, 1),  # 160 septets: € takes two
    ("a" * 159 + "€", GSM7, 2),  # 161 septets
    ("{}" * 80, GSM7, 3),  # 160 characters, 320 septets: 152 + 152 + 16 (no pair split)
    ("^" * 80, GSM7, 1),
    # 306 septets, but the escape pair may not straddle segments 1 and 2: three
    ("a" * 152 + "€" + "a" * 152, GSM7, 3),
    ("a" * 599 + "\u2019", UCS2, 9),  # one curly quote: 600 UCS-2 units, 67 a segment
    ("a" * 600, GSM7, 4),
    ("ж" * 70, UCS2, 1),
    ("ж" * 71, UCS2, 2),
    ("ж" * 134, UCS2, 2),
    ("ж" * 135, UCS2, 3),
    (EMOJI * 35, UCS2, 1),  # 70 units
    (EMOJI * 36, UCS2, 2),
    # 134 units, but the surrogate pair may not straddle segments 1 and 2: three
    ("a" * 66 + EMOJI + "a" * 66, UCS2, 3),
    ("Ça coûte 5 €", UCS2, 1),  # û is not in the alphabet
    ("Ça a été 5 € à Åsa", GSM7, 1),
    ("tab\there", UCS2, 1),
    ("\x1b[31m", UCS2, 1),  # a lone escape is no character of the alphabet
])
def test_known_counts(text, encoding, n):
    size = count(text)
    assert (size.encoding, size.segments) == (encoding, n)


def test_every_character_of_the_alphabet_and_its_extension():
    basic = ("@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZ"
             "ÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà")
    assert len(basic) == 127 and count(basic) == segments.Size(GSM7, 1, 127)
    assert count("\x0c^{}\\[~]|€") == segments.Size(GSM7, 1, 20)
    for other in ("ç", "`", "\u2019", "¢", "á", "\t", "\x1b", "€\u200d"):
        assert count(other + basic[:10]).encoding == UCS2, other


def test_room_for_the_budget():
    assert segments.room(1) == (160, 70) and segments.room(3) == (459, 201)


# -- smart encoding -------------------------------------------------------------------


def test_smart_encoding_replaces_look_alikes():
    text = "\u201cDon\u2019t\u201d \u2013 it\u2019s 9\u00a0am\u2026 \u00bd price \u2014 \uff21\uff11 \u2022 ok\u200b"
    assert smart_encode(text) == "\"Don't\" - it's 9 am... 1/2 price - A1 - ok"
    assert count(smart_encode(text)).encoding == GSM7


def test_smart_encoding_keeps_emoji_and_other_scripts_as_written():
    for text in (f"Don\u2019t worry {EMOJI}", "\u041d\u0435 \u0431\u0435\u0441\u043f\u043e\u043a\u043e\u0439\u0442"
                 "\u0435\u0441\u044c\u2026", "\u4f60\u597d\u3002\u8c22\u8c22\uff01"):
        assert smart_encode(text) == text


def test_smart_encoding_never_costs_more():
    text = "\u2026" * 60  # 60 UCS-2 units (one segment) but 180 septets as "..." (two)
    assert smart_encode(text) == text


# -- the budget -----------------------------------------------------------------------

SENTENCES = " ".join(f"Sentence number {n} says something useful." for n in range(40))


def test_a_long_reply_is_cut_at_a_sentence_within_the_budget():
    cut = fit(SENTENCES, 3)
    assert count(cut).segments <= 3 and cut.endswith("useful.") and SENTENCES.startswith(cut)
    assert len(cut) > 400  # not cut far short of the 459 characters three segments hold


def test_a_curly_quote_is_replaced_before_the_budget_is_counted():
    text = SENTENCES.replace("says", "say\u2019s", 1)
    smart, kept = fit(text, 3), fit(text, 3, smart=False)
    assert "\u2019" not in smart and count(smart).encoding == GSM7 and len(smart) > 400
    assert "\u2019" in kept and count(kept).encoding == UCS2 and count(kept).segments <= 3 and len(kept) <= 201


def test_without_a_sentence_end_it_is_cut_at_a_word_with_an_ellipsis():
    cut = fit("word " * 200, 2)
    assert cut.endswith("word...") and count(cut).segments <= 2 and len(cut) > 280


def test_without_a_space_it_is_cut_between_whole_characters():
    family = "\U0001F468\u200d\U0001F469\u200d\U0001F467"  # one emoji of three joined
    cut = fit(family * 40, 1)
    assert cut.endswith(family + "...") and count(cut).segments == 1
    accents = ("e\u0301" * 100).replace(" ", "")
    assert not fit(accents, 1).removesuffix("...").endswith("e")


def test_a_reply_within_the_budget_is_only_trimmed():
    assert fit("  hi there  ", 1) == "hi there"


# -- properties -----------------------------------------------------------------------

GSM_ONLY = list("aZ9 .!?\n") + ["€", "{", "^"]
ALPHABET = st.sampled_from(GSM_ONLY + ["\u2019", "\u2026", "ж", EMOJI, "\u00a0", "\u4f60"])
# All-GSM texts apart (a random mix is almost never all GSM-7), and texts long enough to split
# (hypothesis draws short lists unless told otherwise).
TEXTS = st.one_of(st.lists(st.sampled_from(GSM_ONLY), min_size=140, max_size=700),
                  st.lists(ALPHABET, min_size=60, max_size=400), st.lists(ALPHABET, max_size=20)).map("".join)


def brute_force_segments(text):
    """Split the encoded bytes themselves: GSM-7 as escape + septet tokens, UCS-2 as UTF-16
    big-endian bytes, a segment never ending on an escape or a high surrogate."""
    if all(c in segments.GSM_BASIC or c in segments.GSM_EXTENSION for c in text):
        septets = [s for c in text for s in ((0x1B, ord(c)) if c in segments.GSM_EXTENSION else (ord(c),))]
        single, per, unit, broken = 160, 153, 1, lambda part: part[-1] == 0x1B
    else:
        septets = list(text.encode("utf-16-be"))
        single, per, unit, broken = 140, 134, 2, lambda part: 0xD8 <= part[-2] <= 0xDB
    if len(septets) <= single:
        return 1
    parts = 0
    while septets:
        part = septets[:per]
        if len(septets) > per and broken(part):
            part = part[:-unit]
        septets = septets[len(part):]
        parts += 1
    return parts


def test_two_unit_characters_around_every_segment_boundary_match_the_brute_force_splitter():
    """Random texts rarely put an escape pair or a surrogate pair right on a boundary: try them all."""
    for filler, pair, around in (("a", "€", range(145, 161)), ("ж", EMOJI, range(62, 71)), ("a", EMOJI, range(62, 71))):
        for before in around:
            for after in range(0, 330, 3):
                text = filler * before + pair + filler * after + pair * (after % 4)
                assert count(text).segments == brute_force_segments(text), (before, after)


@settings(max_examples=300, deadline=None)
@given(TEXTS)
def test_counts_match_a_brute_force_splitter(text):
    assert count(text).segments == brute_force_segments(text)


@settings(max_examples=300, deadline=None)
@given(TEXTS, ALPHABET)
def test_counts_never_fall_as_a_text_grows(text, more):
    assert count(text + more).segments >= count(text).segments
    assert count(text[: len(text) // 2]).segments <= count(text).segments


@settings(max_examples=300, deadline=None)
@given(TEXTS, st.integers(min_value=1, max_value=4), st.booleans())
def test_a_fitted_reply_keeps_the_budget(text, budget, smart):
    out = fit(text, budget, smart)
    assert count(out).segments <= budget
    whole = (smart_encode(text.strip()).strip() if smart else text.strip())
    assert whole.startswith(out.removesuffix("..."))
