"""Keyword matching as SPEC §3 defines it: word start, case-insensitive, negation in the same sentence."""

import pytest

from fhir_plugin._text import Terms


@pytest.mark.parametrize(
    "text, found",
    [
        ("Pain aggravated by standing", True),  # word start: aggravat -> aggravated
        ("AGGRAVATES on stairs", True),  # case-insensitive
        ("reaggravated", False),  # not at the start of a word
    ],
)
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


@pytest.mark.parametrize(
    "text, negated",
    [
        ("Denies fever.", True),
        ("No numbness or tingling", True),
        ("Negative for weight loss", True),
        ("Without saddle anesthesia", True),
        ("Fever present", False),
        ("Denies fever but reports numbness", None),  # the clause break ends the negation
        ("Nothing notable; numbness in the foot", False),  # 'no' inside 'nothing' is not a negation
    ],
)
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


# --- SPEC §3.2, rule by rule: each with examples that match and examples that do not ----------

from fhir_plugin._text import analyze, side_mentions  # noqa: E402


@pytest.mark.parametrize(
    "keyword, text, found",
    [
        ("spasm", "Two spasms overnight", True),  # plural s
        ("bruise", "bruises on the shin", True),  # plural es... and s
        ("ache", "no aches", True),
        ("spasm", "spasmodic cough", False),  # whole word, not a prefix
        ("back", "background noise", False),  # "background" is not "back"
        ("back", "back/neck stiffness", True),  # a slash separates words
        ("tender", "non-tender to touch", True),  # a hyphen separates words
        ("lower leg", "lower-leg swelling", True),  # phrase words across a hyphen
        ("lower leg", "lower legging", False),
    ],
    ids=lambda v: str(v),
)
def test_spec_3_2_words_whole_plural_hyphen_slash(keyword, text, found):
    assert bool(Terms([keyword]).mentions(text)) is found


@pytest.mark.parametrize(
    "stem, text, found",
    [
        ("immobiliz*", "immobilized for six weeks", True),
        ("immobiliz*", "IMMOBILIZATION boot", True),
        ("immobiliz*", "immobile patient", False),
        ("metasta*", "metastatic disease", True),
        ("metasta*", "no evidence of spread", False),
        ("fractur*", "refracture", False),  # the stem starts the word
    ],
    ids=lambda v: str(v),
)
def test_spec_3_2_words_stems_marked_with_star(stem, text, found):
    assert bool(Terms([stem]).mentions(text)) is found


@pytest.mark.parametrize(
    "text, found",
    [
        ("Atrophy noted b/l", True),  # "b/l" matched before the slash splits it
        ("B/L calf wasting", True),
        ("lb/lt", False),
        ("b l", False),
    ],
    ids=lambda v: str(v),
)
def test_spec_3_2_words_slash_terms_matched_before_splitting(text, found):
    assert bool(Terms(["b/l"]).mentions(text)) is found


def _sides(text: str, side: str = "right") -> bool:
    words = {
        "right": ["right", "rt", "r"],
        "left": ["left", "lt", "l"],
        "bilateral": ["bilateral", "bilaterally", "bilat", "b/l"],
    }[side]
    index = analyze(text)
    sites = sorted(
        (m.start, m.end)
        for m in Terms(["lower leg", "calf", "calves", "gastrocnemius", "thigh", "back"]).mentions(index)
        if m.present
    )
    return any(m.present for m in side_mentions(index, Terms(words), sites))


@pytest.mark.parametrize(
    "text, side, found",
    [
        ("Rt calf thinner", "right", True),
        ("R lower leg wasting", "right", True),
        ("right medial head of gastrocnemius", "right", True),  # three words between
        ("calf on the right", "right", True),  # after the site word
        ("L calf", "left", True),
        ("calves b/l", "bilateral", True),
        ("Feels all right, calf sore", "right", False),  # "all right"
        ("Right now the calf aches", "right", False),  # "right now"
        ("right side of the body and the calf", "right", False),  # more than three words between
        ("Turned left. Calf aches", "left", False),  # not in the same clause
        ("s/l calf cramp", "left", False),  # a lone "l" left by a split is not a side
        ("no right calf atrophy", "right", False),  # a negated side documents nothing
    ],
    ids=lambda v: str(v),
)
def test_spec_3_2_sides_near_a_site_word_in_the_same_clause(text, side, found):
    assert _sides(text, side) is found


_FLAGS = Terms(["fever", "numbness", "weight loss", "cancer", "incontinence", "chills"])


def _state(text: str, term: str) -> str:
    [m] = [m for m in _FLAGS.mentions(text) if m.term == term]
    return "hypothetical" if m.hypothetical else "negated" if m.negated else "present"


@pytest.mark.parametrize(
    "text, term, state",
    [
        ("Denies chills, fever or weight loss", "weight loss", "negated"),  # commas do not end a clause
        ("Denies chills, reports a 4 kg weight loss", "weight loss", "present"),  # "reports" starts a clause
        ("Pelvic cancer was ruled out", "cancer", "negated"),  # after the match
        ("Does not endorse numbness", "numbness", "negated"),
        ("Fever not present today", "fever", "negated"),
        ("Free of fever since Monday", "fever", "negated"),
        ("Never had cancer", "cancer", "negated"),
        ("No chills; fever to 38.6", "fever", "present"),  # ';' ends the clause
        ("No chills although fever at night", "fever", "present"),
        ("Without chills yet numbness in toes", "numbness", "present"),
        ("No rash c/o numbness", "numbness", "present"),  # "c/o" starts a clause
        ("Notes numbness in the toes", "numbness", "present"),  # "no" is a whole word
        ("Fever: none", "fever", "negated"),
        ("Chills\nfever absent", "fever", "negated"),
        ("No chills\nFever", "fever", "present"),  # a line break ends a clause
    ],
    ids=lambda v: str(v),
)
def test_spec_3_2_negation_holds_inside_one_clause(text, term, state):
    assert _state(text, term) == state


@pytest.mark.parametrize(
    "text, term, state",
    [
        ("Return if fever, numbness or incontinence develop", "incontinence", "hypothetical"),
        ("Should numbness recur, call the clinic", "numbness", "hypothetical"),
        ("Watch for fever over the weekend", "fever", "hypothetical"),
        ("Warning signs reviewed: incontinence, numbness", "numbness", "hypothetical"),
        ("In case of fever take paracetamol", "fever", "hypothetical"),
        ("Unless weight loss continues, no scan", "weight loss", "hypothetical"),
        ("Fever since Monday. Return if worse", "fever", "present"),  # the "if" is in another clause
        ("Fever; monitor for chills", "fever", "present"),  # the trigger stands after it
        ("Reports numbness if standing long", "numbness", "present"),  # "if" after the match
    ],
    ids=lambda v: str(v),
)
def test_spec_3_2_hypothetical_mentions(text, term, state):
    assert _state(text, term) == state


@pytest.mark.parametrize(
    "text, family",
    [
        ("Family history: colon cancer", True),
        ("FHx of cancer in two aunts", True),
        ("Mother died of cancer at 70", True),
        ("Her brother has fever", True),
        ("Patient treated for cancer in 2019", False),
        ("Cancer screening up to date. Mother well", False),  # the relative is in another clause
    ],
    ids=lambda v: str(v),
)
def test_spec_4_text_about_relatives(text, family):
    mentions = [m for m in _FLAGS.mentions(text) if m.term in ("cancer", "fever")]
    assert mentions and mentions[0].family is family


def test_spec_3_2_cost_is_linear_in_the_text():
    # SPEC §3.2 Cost: a note without a sentence break is read clause by clause, not once per match
    import time

    def seconds(n: int) -> float:
        text = ", ".join(["denies fever reports numbness and no weight loss"] * n)
        best = float("inf")
        for _ in range(3):
            t0 = time.process_time()
            _FLAGS.mentions(text + f" {n}")
            best = min(best, time.process_time() - t0)
        return best

    small, large = seconds(2_000), seconds(16_000)
    assert large < small * 8 * 2.5  # eight times the text, well under sixty-four times the time
