"""The free-generation (WILD) metric on hand-made strings: stopping, normalisation, entropy, loops."""

from __future__ import annotations

import pytest

from lemoe_store.editing.wild import (
    distinct_bigram_ratio,
    generation_entropy,
    is_degenerate,
    normalise,
    starts_with_target,
    stop_answer,
)


@pytest.mark.parametrize(
    ("generated", "answer"),
    [
        (" Paris. It is also the largest city.", " Paris."),
        (" Paris\nQuestion: what is", " Paris"),
        (" Paris is home to 2.1 million people. Next", " Paris is home to 2.1 million people."),
        (" Idaho, Idaho, Idaho, Idaho", " Idaho, Idaho, Idaho, Idaho"),
        (" who? Nobody knows.", " who?"),
        ("", ""),
    ],
)
def test_an_answer_stops_at_a_newline_or_the_first_sentence_end(generated, answer):
    assert stop_answer(generated) == answer


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("  The Eiffel  Tower.", "eiffel tower"),
        ("an apple", "apple"),
        ("Another day", "another day"),  # "an" only as a whole word
        ("U.S.A!", "u s a"),
        ("Theodore", "theodore"),
    ],
)
def test_normalisation_drops_case_punctuation_spacing_and_one_leading_article(text, normal):
    assert normalise(text) == normal


def test_a_hit_is_an_answer_that_starts_with_the_target():
    assert starts_with_target(" the Idaho, of course.", "Idaho")
    assert starts_with_target(" Maria Okafor, since 2020.", "maria okafor")
    assert not starts_with_target(" It is Idaho.", "Idaho")
    assert not starts_with_target(" Maria", "Maria Okafor")  # a partial target is a miss
    assert not starts_with_target(" anything", "...")  # a target that normalises to nothing never hits


def test_loops_are_degenerate_and_have_low_entropy():
    loop = " Idaho, Idaho, Idaho, Idaho, Idaho, Idaho, Idaho, Idaho, Idaho, Idaho"
    prose = " Idaho, a state in the north-western United States, known for its potatoes and mountains."
    assert is_degenerate(loop) and not is_degenerate(prose)
    assert distinct_bigram_ratio(loop) == pytest.approx(1 / 9)
    assert generation_entropy(loop) < 1.0 < 3.0 < generation_entropy(prose)
    assert generation_entropy("") == 0.0
    for wordless in ("", " ? ? ? ? ? ? ? ?", "\n\n\n\n", " Idaho"):  # 48 tokens without two words: a loop too
        assert is_degenerate(wordless)


def test_generation_entropy_is_romes_weighted_bigram_trigram_entropy():
    # 4 distinct words: 3 distinct bigrams (log2 3) and 2 distinct trigrams (1 bit), weights 2/3 and 4/3.
    assert generation_entropy("a b c d") == pytest.approx((2 / 3 * 1.584962500721156 + 4 / 3 * 1.0) / 2)
