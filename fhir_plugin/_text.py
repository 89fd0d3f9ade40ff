"""Finding documentation in free text: word-start keywords, whole words, negation.

SPEC §3: a keyword matches case-insensitively at the start of a word
("aggravat" matches "aggravated"; "back" does not match "feedback").  A match
preceded in the same sentence by a negation word ("no", "denies", "negative
for", "without", "absent" — whole words) is *negated*: it still shows the thing
was examined, and for a red flag it means documented absent.  A clause break
("but", "however") ends a negation's reach, so "denies fever but reports
numbness" negates only the fever.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

__all__ = ["Terms", "Mention", "Vocabulary"]

_WORD_CHAR = r"0-9A-Za-z"
_SENTENCE_BREAK = re.compile(r"[.;!?\n]+(?:\s|$)|\n")
_NEGATION = re.compile(r"(?<![0-9A-Za-z])(?:no|denies|denied|negative\s+for|without|absent)(?![0-9A-Za-z])",
                       re.IGNORECASE)
_CLAUSE_BREAK = re.compile(r"(?<![0-9A-Za-z])(?:but|however|although|except)(?![0-9A-Za-z])", re.IGNORECASE)
_TRAILING_NEGATIVE = re.compile(r"(?<![0-9A-Za-z])(?:negative|absent|none)(?![0-9A-Za-z])", re.IGNORECASE)


@dataclass(frozen=True)
class Mention:
    """One keyword found in a text; ``negated`` when a negation governs it."""

    term: str
    negated: bool


_TOKEN = re.compile(r"[0-9a-z]+")


@lru_cache(maxsize=8192)
def _sentence_breaks(text: str) -> tuple[list[int], list[int]]:
    """Start and end offsets of the sentence breaks in ``text`` (cached: several terms read one text)."""
    starts, ends = [], []
    for m in _SENTENCE_BREAK.finditer(text):
        starts.append(m.start())
        ends.append(m.end())
    return starts, ends


def _sentence_around(text: str, start: int, end: int) -> tuple[int, int]:
    starts, ends = _sentence_breaks(text)
    i = bisect_right(ends, start)            # breaks that end at or before the match
    j = bisect_left(starts, end)             # the first break after the match
    return (ends[i - 1] if i else 0), (starts[j] if j < len(starts) else len(text))


class Vocabulary:
    """The first words of every term a profile uses, found in a text by one scan.

    A term whose first word does not start a word of the text cannot occur, so
    its regular expression is never run on that text: one scan per resource
    instead of one per element (a 1 MB note would otherwise be read ~40 times).
    """

    def __init__(self, terms: Iterable["Terms"]) -> None:
        tokens = sorted(set().union(*(t.first_tokens for t in terms)), key=len, reverse=True)
        self._pattern = re.compile(r"(?<![0-9a-z])(?:" + "|".join(map(re.escape, tokens)) + ")") if tokens else None
        # a longer token found at a position also shows every token that is its prefix
        self._covers = {t: frozenset(u for u in tokens if t.startswith(u)) for t in tokens}

    def scan(self, text: str) -> frozenset[str]:
        if self._pattern is None or not text:
            return frozenset()
        found = {m.group(0) for m in self._pattern.finditer(text.lower())}
        return frozenset().union(*(self._covers[f] for f in found)) if found else frozenset()


def _first_token(term: str) -> str:
    found = _TOKEN.findall(term.lower())
    return found[0] if found else ""


def _phrase(term: str) -> str:
    # a multi-word keyword tolerates any run of white space between its words
    return r"\s+".join(re.escape(part) for part in term.split())


class Terms:
    """A compiled set of keywords (word-start) and whole words, searched in one pass."""

    def __init__(self, keywords: Iterable[str] = (), words: Iterable[str] = ()) -> None:
        keywords, words = list(keywords), list(words)
        parts = [rf"(?<![{_WORD_CHAR}]){_phrase(k)}" for k in keywords]
        parts += [rf"(?<![{_WORD_CHAR}]){_phrase(w)}(?![{_WORD_CHAR}])" for w in words]
        self._pattern = re.compile("|".join(parts), re.IGNORECASE) if parts else None
        self.first_tokens = frozenset(filter(None, (_first_token(t) for t in keywords + words)))

    def may_occur(self, found: frozenset[str]) -> bool:
        """False when none of the terms' first words was found by a ``Vocabulary`` scan."""
        return not self.first_tokens.isdisjoint(found)

    def __bool__(self) -> bool:
        return self._pattern is not None

    def mentions(self, text: str, *, trailing_negative: bool = False) -> list[Mention]:
        """Every match in ``text`` with its negation, judged within its own sentence.

        ``trailing_negative`` also reads "fever: negative" as negated; red flags
        want that, site and finding elements do not ("calf atrophy, neuro exam negative").
        """
        if self._pattern is None or not text:
            return []
        found: list[Mention] = []
        for match in self._pattern.finditer(text):
            first, last = _sentence_around(text, match.start(), match.end())
            before = text[first: match.start()]
            breaks = [m.end() for m in _CLAUSE_BREAK.finditer(before)]
            scope = before[breaks[-1]:] if breaks else before
            negated = bool(_NEGATION.search(scope))
            if not negated and trailing_negative:
                # "Saddle anesthesia: negative" / "fever absent" — a documented negative after the term
                after = text[match.end(): last]
                cut = _CLAUSE_BREAK.search(after)
                negated = bool(_TRAILING_NEGATIVE.search(after[: cut.start()] if cut else after))
            found.append(Mention(match.group(0), negated))
        return found

    def search(self, text: str) -> bool:
        """True when any term occurs, negated or not (cheap pre-check)."""
        return bool(self._pattern and text and self._pattern.search(text))

