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
from bisect import bisect_left
from dataclasses import dataclass
from typing import Iterable, Sequence

__all__ = ["Terms", "Mention", "WordIndex", "compile_terms"]

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


class WordIndex:
    """The sorted distinct words of a text: a cheap test of whether a term can occur at all.

    Built once per resource; a term whose first word starts no word of the text
    is skipped without running its regular expression over the whole text (a
    1 MB note would otherwise be scanned once per element).
    """

    def __init__(self, text: str) -> None:
        self.words: list[str] = sorted(set(_TOKEN.findall(text.lower())))

    def has_prefix(self, prefix: str) -> bool:
        i = bisect_left(self.words, prefix)
        return i < len(self.words) and self.words[i].startswith(prefix)

    def has_word(self, word: str) -> bool:
        i = bisect_left(self.words, word)
        return i < len(self.words) and self.words[i] == word


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
        # a one-word whole-word term must equal a word; anything else must start one
        self._prefixes: Sequence[str] = [_first_token(t) for t in keywords] + \
            [_first_token(w) for w in words if len(_TOKEN.findall(w.lower())) > 1]
        self._words: Sequence[str] = [_first_token(w) for w in words if len(_TOKEN.findall(w.lower())) == 1]

    def may_occur(self, index: WordIndex) -> bool:
        """False when no term can occur in the indexed text (no regex needed)."""
        return any(index.has_prefix(p) for p in self._prefixes) or any(index.has_word(w) for w in self._words)

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
        for sentence in _SENTENCE_BREAK.split(text):
            for match in self._pattern.finditer(sentence):
                before = sentence[: match.start()]
                breaks = [m.end() for m in _CLAUSE_BREAK.finditer(before)]
                scope = before[breaks[-1]:] if breaks else before
                negated = bool(_NEGATION.search(scope))
                if not negated and trailing_negative:
                    # "Saddle anesthesia: negative" / "fever absent" — a documented negative after the term
                    after = sentence[match.end():]
                    cut = _CLAUSE_BREAK.search(after)
                    negated = bool(_TRAILING_NEGATIVE.search(after[: cut.start()] if cut else after))
                found.append(Mention(match.group(0), negated))
        return found

    def search(self, text: str) -> bool:
        """True when any term occurs, negated or not (cheap pre-check)."""
        return bool(self._pattern and text and self._pattern.search(text))


def compile_terms(keywords: Iterable[str] = (), words: Iterable[str] = ()) -> Terms:
    return Terms(keywords, words)
