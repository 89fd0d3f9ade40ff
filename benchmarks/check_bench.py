"""The check's cost: time against note size, and patients per second (SPEC §3.2 *Cost*).

    .venv/bin/python benchmarks/check_bench.py [--out docs/benchmarks-check.md] [--medspacy]

In memory, one thread, no server.  Three measurements:

1. One Observation whose note is 10 KB … 1 MB of clinical-looking text, with sentence breaks and with none
   (the old engine was quadratic without breaks), in the complete synthetic patient's record: the whole
   check's time, best of a few runs (a fresh text every run, so no cache helps).
2. The typical record (the complete synthetic patient) and the 2,000-Observation record: checks per CPU
   second of this process (the one-core rate, even when other work shares the machine).
3. With ``--medspacy``: medspacy's ConText (a blank English spaCy pipeline, SPEC §3.2's triggers as its
   rules) over the same notes and over the typical record's texts, for the choice of engine.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fhir_plugin import check, load_profile
from fhir_plugin._record import records_from_bundle
from fhir_plugin._text import _CLAUSE_WORDS, _HYPOTHETICAL, _POST_NEGATION, _PRE_NEGATION
from fhir_plugin.synthetic import generate_cases, large_record

SIZES_KB = (10, 30, 100, 300, 1000)
# words a long note is made of: findings, negations, hypothetical mentions, sides, sites
_SENTENCE = (
    "Patient denies fever, reports mild calf tenderness on the right side and no numbness "
    "while walking; return if incontinence or weakness develop"
)


def _note(n_bytes: int, breaks: bool, salt: int) -> str:
    """About ``n_bytes`` of note, sentences ended by ". " or run together with ", " (no break at all)."""
    joiner = ". " if breaks else ", "
    unit = f"{_SENTENCE} visit {salt}"
    parts = []
    size = 0
    i = 0
    while size < n_bytes:
        piece = f"{unit} {i}"
        parts.append(piece)
        size += len(piece) + 2
        i += 1
    return joiner.join(parts)[:n_bytes]


def _record_with_note(base: list[dict[str, Any]], note: str) -> Any:
    pid = next(r["id"] for r in base if r["resourceType"] == "Patient")
    obs = {
        "resourceType": "Observation",
        "id": "bench-note",
        "status": "final",
        "code": {"text": "Progress note"},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": "2026-01-01",
        "valueString": note,
    }
    return records_from_bundle(base + [obs])[0]


def _best_of(fn: Callable[[], Any], runs: int) -> float:
    best = float("inf")
    for _ in range(runs):
        c0 = time.process_time()
        fn()
        best = min(best, time.process_time() - c0)
    return best


def _rate(fn: Callable[[], Any], seconds: float) -> float:
    fn()
    n, c0 = 0, time.process_time()
    while time.process_time() - c0 < seconds or n < 3:
        fn()
        n += 1
    return n / (time.process_time() - c0)


def _medspacy_rows(sizes: tuple[int, ...], texts: list[str]) -> list[str]:
    """medspacy's ConText with SPEC §3.2's triggers: time per note size and per typical record."""
    import medspacy  # noqa: F401 - measured only, never a dependency unless it meets the targets
    from loguru import logger

    logger.remove()  # PyRuSH logs every sentence start at DEBUG: that would be the measurement
    import spacy
    from medspacy.context import ConTextRule
    from medspacy.ner import TargetRule

    nlp = spacy.blank("en")
    nlp.add_pipe("medspacy_pyrush")
    matcher = nlp.add_pipe("medspacy_target_matcher")
    matcher.add(
        [
            TargetRule(t, "FLAG")
            for t in ("fever", "numbness", "incontinence", "weakness", "tenderness", "weight loss", "cancer", "calf")
        ]
    )
    context = nlp.add_pipe("medspacy_context", config={"rules": None})
    # SPEC §3.2's triggers, the same lists the plugin's own clause engine reads
    rules = [ConTextRule(t, "NEGATED_EXISTENCE", direction="FORWARD") for t in _PRE_NEGATION]
    rules += [ConTextRule(t, "NEGATED_EXISTENCE", direction="BACKWARD") for t in _POST_NEGATION]
    rules += [ConTextRule(t, "HYPOTHETICAL", direction="FORWARD") for t in _HYPOTHETICAL]
    rules += [ConTextRule(t, "TERMINATE", direction="TERMINATE") for t in _CLAUSE_WORDS]
    context.add(rules)
    rows = []
    for kb in sizes:
        for breaks in (True, False):
            note = _note(kb * 1000, breaks, 7)
            c0 = time.process_time()
            nlp(note)
            rows.append(
                f"| medspacy ConText | {kb} KB | {'yes' if breaks else 'no'} | "
                f"{(time.process_time() - c0) * 1000:.0f} ms |"
            )
    rate = _rate(lambda: [nlp(t) for t in texts], 3.0)
    rows.append(
        f"| medspacy ConText | typical record's texts ({len(texts)} fields) | - | "
        f"{1000 / rate:.2f} ms per record = **{rate:.0f} records/s** (text only, before any check logic) |"
    )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="also write the results as Markdown to this file")
    parser.add_argument("--medspacy", action="store_true", help="also measure medspacy's ConText (if installed)")
    parser.add_argument("--max-kb", type=int, default=1000)
    args = parser.parse_args()
    today = date(2026, 11, 26)
    profile = load_profile("M62.561")
    complete = next(c for c in generate_cases(today) if c.key == "complete")

    lines = [
        f"Run {datetime.now(UTC).isoformat(timespec='seconds')} on {platform.node()} "
        f"({platform.python_implementation()} {platform.python_version()}); CPU time of one thread.",
        "",
        "| note size | sentence breaks | whole check (best of 3) | per MB |",
        "|---|---|---|---|",
    ]
    salt = 0
    for kb in (s for s in SIZES_KB if s <= args.max_kb):
        for breaks in (True, False):
            records = []
            for _ in range(3):
                salt += 1  # a new text each run: nothing is served from a cache
                records.append(_record_with_note(complete.resources, _note(kb * 1000, breaks, salt)))
            t = _best_of(lambda records=records: check(records.pop(), profile, today=today), 3)
            lines.append(f"| {kb} KB | {'yes' if breaks else 'no'} | {t * 1000:.0f} ms | {t / kb * 1000:.2f} s |")

    typical = records_from_bundle(complete.resources)[0]
    big_case = large_record(today, n_observations=2000)
    big = records_from_bundle(big_case.resources)[0]
    typical_rate = _rate(lambda: check(typical, profile, today=today), 3.0)
    big_rate = _rate(lambda: check(big, profile, today=today), 3.0)
    lines += [
        "",
        "| record | checks per CPU second (one core) | time per check |",
        "|---|---|---|",
        f"| typical ({len(complete.resources)} resources) | **{typical_rate:.0f}** | {1000 / typical_rate:.2f} ms |",
        f"| large ({len(big_case.resources)} resources, 2,000 Observations) | {big_rate:.1f} | "
        f"**{1000 / big_rate:.1f} ms** |",
    ]
    print("\n".join(lines), flush=True)
    if args.medspacy:
        from fhir_plugin._check import _fields

        texts = [t for r in complete.resources for t in _fields(r)]
        lines += ["", "| engine | input | sentence breaks | time |", "|---|---|---|---|"]
        lines += _medspacy_rows(tuple(s for s in SIZES_KB if s <= min(args.max_kb, 100)), texts)
    text = "\n".join(lines)
    if args.medspacy:
        print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
