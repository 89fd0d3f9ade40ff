"""Reading free text as SPEC §3.2 says: whole words, clauses, negation, hypothetical mentions, sides.

The engine is a small clause engine in the spirit of ConText (NegEx's successor):
a text is cut into clauses once, its trigger words (negation before / after,
hypothetical, relatives) are found once by a single scan each, and every
keyword match then looks its clause and triggers up by binary search.  Nothing
is re-scanned per match, so the cost is linear in the text (SPEC §3.2 *Cost*):
a 1 MB note without a sentence break costs about what a 1 MB note with them
costs.  medspacy's ConText was measured against the same throughput targets and
was not chosen; docs/benchmarks-check.md gives the figures.

Keywords (SPEC §3.2 *Words*): whole words, case-insensitive, a plural ``s``/``es``
allowed; a keyword written with a trailing ``*`` is a stem and matches any word
starting with it.  Hyphens and slashes separate words ("non-tender" holds
"tender"; "background" is not "back"), but terms written with a slash
("b/l", "c/o") are matched as written, and a one-letter side word left by a
split ("s/l", "r/o") is not a side.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["Terms", "Mention", "Vocabulary", "TextIndex", "analyze", "MAX_FIELD_CHARS", "capped", "side_mentions"]

#: the most characters read from one field of a resource (SPEC §3.2 *Cost*).  A field longer
#: than this is read up to the cap and the check names it in the red flags' and the
#: red-flag screen's detail, so a truncated field never silently drops a red flag.
MAX_FIELD_CHARS = 2_000_000

_W = "0-9A-Za-z"
_START = rf"(?<![{_W}])"
_END = rf"(?![{_W}])"
_GAP = r"[\s\-/]+"  # between the words of a phrase: white space, hyphens, slashes


def _phrase(words: str) -> str:
    return _GAP.join(re.escape(part) for part in words.split())


def _alternation(phrases: Iterable[str]) -> str:
    # longest first, so "negative for" wins over "negative" and "not present" over "not"
    return "|".join(_phrase(p) for p in sorted(set(phrases), key=len, reverse=True))


# SPEC §3.2 *Negation*: clause ends, and the words that start a new clause
_CLAUSE_WORDS = (
    "but",
    "however",
    "although",
    "though",
    "except",
    "yet",
    "reports",
    "reported",
    "endorses",
    "endorsed",
    "complains of",
    "c/o",
    "positive for",
    "presents with",
)
_CLAUSE = re.compile(rf"(?P<stop>[.;!?]+(?=\s|$)|\n)|{_START}(?:{_alternation(_CLAUSE_WORDS)}){_END}")
_PRE_NEGATION = ("no", "not", "denies", "denied", "negative for", "without", "absent", "free of", "never")
_POST_NEGATION = ("absent", "negative", "ruled out", "denied", "not present", "none")
# SPEC §3.2 *Hypothetical mentions* (ConText's hypothetical modifier)
_HYPOTHETICAL = (
    "if",
    "should",
    "unless",
    "in case of",
    "return for",
    "watch for",
    "monitor for",
    "call for",
    "precautions",
    "precaution",
    "warning signs",
    "warning sign",
)
# SPEC §4: text about relatives documents nothing for red flags
_RELATIVES = (
    "mother",
    "father",
    "parent",
    "parents",
    "sibling",
    "siblings",
    "brother",
    "brothers",
    "sister",
    "sisters",
    "child",
    "children",
    "son",
    "sons",
    "daughter",
    "daughters",
    "grandmother",
    "grandfather",
    "grandparent",
    "aunt",
    "uncle",
    "cousin",
    "relative",
    "relatives",
    "mom",
    "dad",
)
_FAMILY_HISTORY = ("family history", "fhx", "fh")
_TRIGGER = re.compile(
    rf"{_START}(?:{_alternation(_PRE_NEGATION + _POST_NEGATION + _HYPOTHETICAL + _RELATIVES)})"
    rf"{_END}"
)
_FH_START = re.compile(rf"\s*(?:{_alternation(_FAMILY_HISTORY)}){_END}")
_SPACES = re.compile(r"\s+")
_PRE = {p.replace(" ", "") for p in _PRE_NEGATION} | {"notpresent"}
_POST = {p.replace(" ", "") for p in _POST_NEGATION}
_HYPO = {p.replace(" ", "") for p in _HYPOTHETICAL}
_REL = set(_RELATIVES)
_WORD = re.compile(rf"[{_W}]+")
# SPEC §3.2 *Sides*: "right now" and "all right" document nothing
_NOT_A_SIDE = re.compile(r"(?:\ball\s+right\b|\bright\s+(?:now|away)\b)", re.IGNORECASE)


def capped(text: str) -> tuple[str, bool]:
    """The part of one field that is read, and whether the field was cut (see MAX_FIELD_CHARS)."""
    if len(text) <= MAX_FIELD_CHARS:
        return text, False
    return text[:MAX_FIELD_CHARS], True


class TextIndex:
    """One text, analysed once: where its clauses start and where its trigger words stand."""

    __slots__ = ("text", "starts", "pre", "post", "hypo", "relative", "family_clauses")

    def __init__(self, text: str) -> None:
        text = text.lower()  # every offset below is into the lower-cased text
        self.text = text
        starts = [0]
        for m in _CLAUSE.finditer(text):
            starts.append(m.end() if m.group("stop") else m.start())
        self.starts = starts  # sorted: finditer yields in order, and each boundary is past the last
        pre: list[int] = []
        post: list[int] = []
        hypo: list[int] = []
        relative: list[int] = []
        for m in _TRIGGER.finditer(text):
            word = _SPACES.sub("", m.group(0)).replace("-", "").replace("/", "")
            at = m.start()
            if word in _PRE or word.startswith("not"):
                pre.append(at)
            if word in _POST:
                post.append(at)
            if word in _HYPO:
                hypo.append(at)
            if word in _REL:
                relative.append(at)
        self.pre, self.post, self.hypo, self.relative = pre, post, hypo, relative
        # a clause that starts "family history", "FHx" or "FH" (SPEC §4)
        self.family_clauses = frozenset(i for i, s in enumerate(starts) if _FH_START.match(text, s))

    def clause(self, start: int) -> tuple[int, int, int]:
        """(index, start, end) of the clause holding the offset ``start``."""
        i = bisect_right(self.starts, start) - 1
        end = self.starts[i + 1] if i + 1 < len(self.starts) else len(self.text)
        return i, self.starts[i], end

    @staticmethod
    def _any(positions: Sequence[int], low: int, high: int) -> bool:
        i = bisect_left(positions, low)
        return i < len(positions) and positions[i] < high

    def judge(self, start: int, end: int) -> tuple[bool, bool, bool]:
        """(negated, hypothetical, about a relative) for a match spanning ``start``..``end``."""
        ci, cs, ce = self.clause(start)
        negated = self._any(self.pre, cs, start) or self._any(self.post, end, ce)
        hypothetical = self._any(self.hypo, cs, start)
        family = ci in self.family_clauses or self._any(self.relative, cs, start)
        return negated, hypothetical, family

    def words_between(self, a: int, b: int, limit: int) -> int:
        """How many words stand in text[a:b], counting no further than ``limit + 1``."""
        n = 0
        for _ in _WORD.finditer(self.text, a, b):
            n += 1
            if n > limit:
                break
        return n


@lru_cache(maxsize=1024)
def _analyze_short(text: str) -> TextIndex:
    return TextIndex(text)


def analyze(text: str) -> TextIndex:
    """The analysed form of a text; short texts are cached (they repeat across resources and patients),
    long ones are not, so the cache never holds more than a few megabytes."""
    return _analyze_short(text) if len(text) <= 4096 else TextIndex(text)


@dataclass(frozen=True)
class Mention:
    """One keyword found in a text, with what governs it in its clause (SPEC §3.2, §4)."""

    term: str
    negated: bool
    hypothetical: bool = False
    family: bool = False
    start: int = 0
    end: int = 0

    @property
    def present(self) -> bool:
        """Documents the thing as there: not negated, not hypothetical."""
        return not self.negated and not self.hypothetical


def _term_pattern(term: str) -> str:
    term = term.strip().lower()
    if term.endswith("*"):
        return rf"{_phrase(term[:-1])}[{_W}]*"
    return rf"{_phrase(term)}(?:s|es)?{_END}"


def _first_token(term: str) -> str:
    found = _WORD.findall(term.lower())
    return found[0].lower() if found else ""


class Vocabulary:
    """The first words of every term a profile uses, found in a text by one scan.

    A term whose first word does not start a word of the text cannot occur, so
    its expression is never run on that text: one scan per resource instead of
    one per element.
    """

    def __init__(self, terms: Iterable[Terms]) -> None:
        tokens = sorted(set().union(*(t.first_tokens for t in terms)), key=len, reverse=True)
        self._pattern = re.compile(r"(?<![0-9a-z])(?:" + "|".join(map(re.escape, tokens)) + ")") if tokens else None
        # a longer token found at a position also shows every token that is its prefix
        self._covers = {t: frozenset(u for u in tokens if t.startswith(u)) for t in tokens}
        self._short: dict[str, frozenset[str]] = {}

    def scan(self, text: str) -> frozenset[str]:
        if self._pattern is None or not text:
            return frozenset()
        short = len(text) <= 256
        if short:
            # short texts repeat (vital-sign names, answer Observations): remember them
            known = self._short.get(text)
            if known is not None:
                return known
        found = {m.group(0) for m in self._pattern.finditer(text.lower())}
        out = frozenset().union(*(self._covers[f] for f in found)) if found else frozenset()
        if short:
            if len(self._short) >= 8192:
                self._short.clear()
            self._short[text] = out
        return out


class Terms:
    """A compiled set of keywords, searched in one pass (SPEC §3.2 *Words*).

    ``keywords`` and ``words`` are read alike (whole words, ``*`` for a stem);
    ``words`` is kept for profiles written before the two forms were one.
    """

    def __init__(self, keywords: Iterable[str] = (), words: Iterable[str] = ()) -> None:
        terms = [t for t in list(keywords) + list(words) if t.strip().rstrip("*")]
        # longest first, so "lower leg" is one match rather than a shorter term inside it
        terms.sort(key=len, reverse=True)
        self.terms = tuple(terms)
        # matched in the lower-cased text (the index keeps one); one lookbehind for every term
        self._pattern = re.compile(_START + "(?:" + "|".join(_term_pattern(t) for t in terms) + ")") if terms else None
        self.first_tokens = frozenset(filter(None, (_first_token(t) for t in terms)))

    def may_occur(self, found: frozenset[str]) -> bool:
        """False when none of the terms' first words was found by a ``Vocabulary`` scan."""
        return not self.first_tokens.isdisjoint(found)

    def __bool__(self) -> bool:
        return self._pattern is not None

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Where the terms occur, as (start, end) offsets."""
        if self._pattern is None or not text:
            return []
        return [m.span() for m in self._pattern.finditer(text)]

    def mentions(self, text: str | TextIndex, *, trailing_negative: bool = True) -> list[Mention]:
        """Every match with its negation, hypothetical and relative flags, judged in its own clause.

        ``trailing_negative`` is kept for callers written before SPEC §3.2 made the
        after-match negations ("fever absent", "cancer ruled out") part of every reading;
        ``False`` ignores them.
        """
        if self._pattern is None or not text:
            return []
        index = text if isinstance(text, TextIndex) else analyze(text)
        found: list[Mention] = []
        for match in self._pattern.finditer(index.text):
            start, end = match.span()
            negated, hypothetical, family = index.judge(start, end)
            if negated and not trailing_negative:
                ci, cs, _ce = index.clause(start)
                negated = TextIndex._any(index.pre, cs, start)
            found.append(Mention(match.group(0), negated, hypothetical, family, start, end))
        return found

    def search(self, text: str) -> bool:
        """True when any term occurs, whatever governs it (cheap pre-check)."""
        return bool(self._pattern and text and self._pattern.search(text.lower()))


def side_mentions(
    index: TextIndex, side_terms: Terms, site_spans: list[tuple[int, int]], *, max_words: int = 3
) -> list[Mention]:
    """Side words that document a side: within ``max_words`` words of a site word in their clause.

    SPEC §3.2 *Sides*.  ``site_spans`` are the site words of the text (the profile's site or
    a conflicting one), sorted.  "right now", "all right" and a one-letter side word left by
    a hyphen or slash split document nothing.
    """
    text = index.text
    if not site_spans:
        return []
    site_starts = [s for s, _e in site_spans]
    out: list[Mention] = []
    for m in side_terms.mentions(index):
        if len(m.term) == 1 and (
            (m.start > 0 and text[m.start - 1] in "/-") or (m.end < len(text) and text[m.end] in "/-")
        ):
            continue
        if m.term == "right" and _NOT_A_SIDE.search(text, max(0, m.start - 4), min(len(text), m.end + 6)):
            continue
        ci, cs, ce = index.clause(m.start)
        i = bisect_left(site_starts, m.end)
        near = False
        if i < len(site_spans) and site_spans[i][0] < ce:  # the next site word, after the side word
            near = index.words_between(m.end, site_spans[i][0], max_words) <= max_words
        if not near and i > 0 and site_spans[i - 1][1] <= m.start and site_spans[i - 1][0] >= cs:
            near = index.words_between(site_spans[i - 1][1], m.start, max_words) <= max_words
        if near:
            out.append(m)
    return out
