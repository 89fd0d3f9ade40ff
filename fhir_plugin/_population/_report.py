"""The population's summary, worklist and HTML report. Pure: rows in, text out.

The report is one offline HTML file: no script, no external style or font, every plot
an inline SVG with a title and a description, and a table beside every plot with the
same numbers (what a screen reader reads).  Words are plain: "documentation gaps",
"code fits", "referral recommended".
"""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Summary", "summarize", "render_terminal", "render_html", "WORKLIST_LIMIT"]

#: rows the HTML worklist shows; the whole worklist is results.jsonl / results.parquet
WORKLIST_LIMIT = 500

_FIT_WORDS = {
    "fits": "code fits",
    "mismatch": "another code fits better",
    "insufficient": "not enough to tell",
    None: "not checked (record problem)",
}


@dataclass
class Summary:
    """Counts over every row, and the first ``limit`` rows that need someone's attention."""

    patients: int = 0
    problems: int = 0
    complete: int = 0
    referrals: int = 0
    drafts_allowed: int = 0
    gap_frequency: Counter[str] = field(default_factory=Counter)
    code_fit: Counter[str] = field(default_factory=Counter)
    red_flags: Counter[str] = field(default_factory=Counter)
    gap_counts: Counter[int] = field(default_factory=Counter)
    worklist: list[dict[str, Any]] = field(default_factory=list)
    worklist_total: int = 0

    @property
    def checked(self) -> int:
        return self.patients - self.problems


def needs_attention(row: Mapping[str, Any]) -> bool:
    """A worklist row: a gap, a code that does not fit, a referral, or a record that could not be checked."""
    return bool(row.get("problem") or not row.get("complete") or row.get("referral"))


def summarize(rows: Iterable[Mapping[str, Any]], limit: int = WORKLIST_LIMIT) -> Summary:
    """One pass over the rows (a stream: memory stays flat however many patients)."""
    s = Summary()
    for row in rows:
        s.patients += 1
        if row.get("problem"):
            s.problems += 1
        else:
            s.complete += bool(row.get("complete"))
            s.referrals += bool(row.get("referral"))
            s.drafts_allowed += bool(row.get("drafts_allowed"))
            gaps = list(row.get("gaps") or [])
            s.gap_frequency.update(gaps)
            s.gap_counts[len(gaps)] += 1
            s.red_flags.update(row.get("red_flags") or [])
        s.code_fit[str(row.get("code_fit") or "none")] += 1
        if needs_attention(row):
            s.worklist_total += 1
            if len(s.worklist) < limit:
                s.worklist.append({k: row.get(k) for k in WORKLIST_COLUMNS})
    return s


#: the row's columns the worklist shows (the rest of ``_rows.ROW_COLUMNS`` is detail for the Parquet file)
WORKLIST_COLUMNS = (
    "patient",
    "encounter",
    "complete",
    "code_fit",
    "suggested",
    "gaps",
    "red_flags",
    "referral",
    "drafts_allowed",
    "problem",
)


def _pct(n: int, total: int) -> str:
    return f"{100.0 * n / total:.1f}%" if total else "0%"


def render_terminal(
    s: Summary, problems: Sequence[Mapping[str, Any]] = (), export_issues: Sequence[Mapping[str, Any]] = ()
) -> str:
    """The summary the command prints: counts, the most frequent gaps, and every reported problem."""
    lines = [
        f"{s.patients} patients: {s.complete} complete ({_pct(s.complete, s.patients)}), "
        f"{s.checked - s.complete} with documentation gaps or a code that does not fit, "
        f"{s.referrals} with a referral recommended, {s.problems} whose record could not be checked.",
        "Code fit: "
        + ", ".join(f"{_FIT_WORDS.get(k if k != 'none' else None, k)} {n}" for k, n in sorted(s.code_fit.items()))
        + ".",
    ]
    if s.gap_frequency:
        top = ", ".join(f"{k} {n}" for k, n in s.gap_frequency.most_common(5))
        lines.append(f"Most frequent gaps: {top}.")
    lines.append(f"Drafts allowed for {s.drafts_allowed} patients; the worklist has {s.worklist_total} patients.")
    for p in list(problems) + list(export_issues):
        where = p.get("file") or "?"
        if p.get("line"):
            where += f" line {p['line']}"
        lines.append(f"problem: {where}: {p.get('problem')}")
    return "\n".join(lines)


# ---- HTML ------------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _bar_chart(chart_id: str, title: str, items: Sequence[tuple[str, int]], total: int, unit: str) -> str:
    """A horizontal bar chart as inline SVG, with its numbers in a table beside it."""
    width, label_w, bar_w, row_h = 640, 230, 330, 24
    height = row_h * max(1, len(items)) + 10
    peak = max((n for _, n in items), default=0) or 1
    bars = []
    for i, (label, n) in enumerate(items):
        y = 5 + i * row_h
        w = max(1, round(bar_w * n / peak)) if n else 0
        bars.append(
            f'<text x="{label_w - 6}" y="{y + 16}" text-anchor="end">{_e(label)}</text>'
            f'<rect x="{label_w}" y="{y + 3}" width="{w}" height="{row_h - 8}" class="bar"/>'
            f'<text x="{label_w + w + 6}" y="{y + 16}">{n}</text>'
        )
    desc = "; ".join(f"{label}: {n}" for label, n in items) or "nothing to show"
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" aria-labelledby="{chart_id}-t {chart_id}-d" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
        f'<title id="{chart_id}-t">{_e(title)}</title><desc id="{chart_id}-d">{_e(desc)}</desc>'
        + "".join(bars)
        + "</svg>"
    )
    rows = "".join(
        f'<tr><th scope="row">{_e(label)}</th><td>{n}</td><td>{_pct(n, total)}</td></tr>' for label, n in items
    )
    table = (
        f'<table aria-describedby="{chart_id}-h"><thead><tr><th scope="col">{_e(unit)}</th>'
        f'<th scope="col">patients</th><th scope="col">share</th></tr></thead><tbody>{rows}</tbody></table>'
    )
    return (
        f'<section class="plot" aria-labelledby="{chart_id}-h"><h2 id="{chart_id}-h">{_e(title)}</h2>'
        f'<div class="pair"><figure>{svg}</figure>{table}</div></section>'
    )


def _list(values: Any) -> str:
    return ", ".join(str(v) for v in values or []) or "—"


def _worklist(s: Summary) -> str:
    head = (
        '<tr><th scope="col">patient</th><th scope="col">encounter</th><th scope="col">code fit</th>'
        '<th scope="col">documentation gaps</th><th scope="col">red flags present</th>'
        '<th scope="col">referral</th><th scope="col">drafts allowed</th><th scope="col">problem</th></tr>'
    )
    body = "".join(
        f'<tr><th scope="row">{_e(r["patient"])}</th><td>{_e(r.get("encounter") or "—")}</td>'
        f"<td>{_e(_FIT_WORDS.get(r.get('code_fit'), r.get('code_fit')))}"
        f"{' (suggests ' + _e(_list(r.get('suggested'))) + ')' if r.get('suggested') else ''}</td>"
        f"<td>{_e(_list(r.get('gaps')))}</td><td>{_e(_list(r.get('red_flags')))}</td>"
        f"<td>{'yes' if r.get('referral') else 'no'}</td><td>{'yes' if r.get('drafts_allowed') else 'no'}</td>"
        f"<td>{_e(r.get('problem') or '—')}</td></tr>"
        for r in s.worklist
    )
    shown = (
        f"The first {len(s.worklist)} of {s.worklist_total} patients who need attention; the whole "
        "worklist is in results.jsonl and results.parquet."
        if s.worklist_total > len(s.worklist)
        else f"All {s.worklist_total} patients who need attention."
    )
    return (
        f'<section aria-labelledby="worklist-h"><h2 id="worklist-h">Worklist</h2><p>{_e(shown)}</p>'
        f'<div class="scroll"><table><caption>Patients with documentation gaps, a code that does not fit, '
        f"a referral recommended, or a record that could not be checked</caption><thead>{head}</thead>"
        f"<tbody>{body}</tbody></table></div></section>"
    )


_CSS = """body{font-family:system-ui,sans-serif;margin:2rem;color:#1a1a1a;max-width:80rem}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem}
.pair{display:flex;flex-wrap:wrap;gap:2rem;align-items:flex-start}figure{margin:0}
svg text{font-size:13px;fill:#1a1a1a}.bar{fill:#1f5f9e}
table{border-collapse:collapse}th,td{border:1px solid #999;padding:.25rem .5rem;text-align:left;vertical-align:top}
thead th{background:#eef2f6}.scroll{overflow-x:auto}caption{text-align:left;font-weight:600;padding:.25rem 0}
.problems li{margin:.2rem 0}"""


def render_html(
    s: Summary,
    *,
    profile_code: str,
    source: str,
    generated: str,
    problems: Sequence[Mapping[str, Any]] = (),
    export_issues: Sequence[Mapping[str, Any]] = (),
) -> str:
    """The whole report page (offline: no script, no external resource)."""
    checked = s.checked
    fit = [(_FIT_WORDS.get(k if k != "none" else None, k), n) for k, n in sorted(s.code_fit.items())]
    gaps = sorted(s.gap_frequency.items(), key=lambda kv: (-kv[1], kv[0]))
    referrals = [("referral recommended", s.referrals), ("no referral", checked - s.referrals)]
    by_count = [(f"{k} gap{'s' if k != 1 else ''}", s.gap_counts[k]) for k in sorted(s.gap_counts)]
    all_problems = list(problems) + list(export_issues)
    problem_items = "".join(
        f"<li>{_e(p.get('file') or '?')}{' line ' + _e(p['line']) if p.get('line') else ''}: "
        f"{_e(p.get('problem'))}</li>"
        for p in all_problems
    )
    problem_part = (
        f'<section aria-labelledby="problems-h"><h2 id="problems-h">Problems in the input</h2>'
        f"<p>These lines were left out; every other patient was checked.</p>"
        f'<ul class="problems">{problem_items}</ul></section>'
        if all_problems
        else ""
    )
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
        'img-src data:">'
        f"<title>Documentation worklist for {_e(profile_code)}</title><style>{_CSS}</style></head><body><main>"
        f"<h1>Documentation worklist for {_e(profile_code)}</h1>"
        f"<p>{s.patients} patients from {_e(source)}, checked {_e(generated)}. "
        f"{s.complete} ({_pct(s.complete, s.patients)}) have complete documentation and a code that fits; "
        f"{checked - s.complete} need more documentation or another code; {s.referrals} have a red flag, so a "
        f"referral is recommended; {s.problems} records could not be checked.</p>"
        + _bar_chart("gaps", "How often each documentation element is missing or conflicting", gaps, checked, "element")
        + _bar_chart("fit", "Does the code fit the documentation?", fit, s.patients, "code fit")
        + _bar_chart("ref", "Referrals recommended (a red flag is present)", referrals, checked, "referral")
        + _bar_chart("count", "Patients by number of documentation gaps", by_count, checked, "gaps")
        + _worklist(s)
        + problem_part
        + "</main></body></html>\n"
    )
