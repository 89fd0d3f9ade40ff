"""Keyword matching as SPEC §3 defines it: word start, case-insensitive, negation in the same sentence."""

import pytest

from fhir_plugin._text import Terms


@pytest.mark.parametrize("text, found", [
    ("Pain aggravated by standing", True),       # word start: aggravat -> aggravated
    ("AGGRAVATES on stairs", True),              # case-insensitive
    ("reaggravated", False),                     # not at the start of a word
])
def test_word_start(text, found):
    # SPEC §3.2 Words: a stem is written with a trailing "*" in the profile
    assert bool(Terms(["aggravat*"]).mentions(text)) is found


def test_back_does_not_match_feedback():
    assert Terms(["back"]).mentions("Patient gave feedback on the exercises") == []
    assert Terms(["back"]).mentions("Low back pain") != []


def test_whole_word_rom():
    terms = Terms(words=["ROM"])
    assert terms.mentions("Full ROM at the ankle")
    assert not terms.mentions("from romance")


@pytest.mark.parametrize("text, negated", [
    ("Denies fever.", True),
    ("No numbness or tingling", True),
    ("Negative for weight loss", True),
    ("Without saddle anesthesia", True),
    ("Fever present", False),
    ("Denies fever but reports numbness", None),   # the clause break ends the negation
    ("Nothing notable; numbness in the foot", False),   # 'no' inside 'nothing' is not a negation
])
def test_negation(text, negated):
    terms = Terms(["fever", "numbness", "weight loss", "saddle anesthesia"])
    mentions = terms.mentions(text)
    if negated is None:
        assert [m.negated for m in mentions] == [True, False]
    else:
        assert mentions and all(m.negated is negated for m in mentions)


def test_trailing_negative_only_when_asked():
    terms = Terms(["saddle anesthesia", "atrophy"])
    assert terms.mentions("Saddle anesthesia: negative", trailing_negative=True)[0].negated
    # SPEC §3.2 Negation: "negative" after the match in the same clause negates it (commas do not
    # end a clause); a sentence break keeps the finding
    assert terms.mentions("Calf atrophy, neuro exam negative")[0].negated
    assert not terms.mentions("Calf atrophy. Neuro exam negative")[0].negated


def test_negation_stops_at_the_sentence():
    mentions = Terms(["numbness"]).mentions("No fever. Numbness in the right foot.")
    assert [m.negated for m in mentions] == [False]
