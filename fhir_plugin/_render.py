"""The human view of a report: the same facts as the JSON, as a terminal table."""

from __future__ import annotations

from ._report import Report

__all__ = ["render_text", "render_summary"]

_MARK = {"met": "ok", "missing": "--", "conflict": "!!", "not-yet-due": "..", "proposed": "~~"}


def render_text(report: Report) -> str:
    head = [
        f"{report.patient}   encounter {report.encounter or '(none)'}   reference date {report.reference_date}",
        f"{report.profile_code}  {report.profile_display}   [{report.icd10cm_release}]",
        "",
    ]
    width = max(len(e.id) for e in report.elements)
    rows = [f"  {'element'.ljust(width)}  req  {'status'.ljust(11)}  evidence / detail"]
    for e in report.elements:
        evidence = ", ".join(e.evidence[:3]) + (f" +{len(e.evidence) - 3}" if len(e.evidence) > 3 else "")
        text = evidence if e.status == "met" and evidence else e.detail
        rows.append(
            f"{_MARK[e.status]} {e.id.ljust(width)}  {'yes' if e.required else 'no '}  {e.status.ljust(11)}  {text}"
        )
    flags = ["", "red flags:"]
    for f in report.red_flags:
        flags.append(f"  {f.id.ljust(27)} {f.status.ljust(15)} {', '.join(f.evidence)}")
    fit = report.code_fit
    tail = ["", f"code fit: {fit.status} - {fit.detail}"]
    tail += [f"  suggested {s.code} {s.display} ({s.reason})" for s in fit.suggested]
    tail += [
        f"complete: {'yes' if report.complete else 'no'}   "
        f"referral recommended: {'YES' if report.referral_recommended else 'no'}"
    ]
    return "\n".join(head + rows + flags + tail)


def render_summary(reports: list[Report]) -> str:
    """One line a patient, for runs over many records; ``--patient ID`` shows one in full."""
    rows = [f"{'patient':<28} {'complete':<9} {'code fit':<13} {'referral':<9} gaps"]
    for r in reports:
        gaps = ", ".join(e.id for e in r.gaps()) or "-"
        rows.append(
            f"{r.patient:<28} {'yes' if r.complete else 'no':<9} {r.code_fit.status:<13} "
            f"{'YES' if r.referral_recommended else 'no':<9} {gaps}"
        )
    done = sum(r.complete for r in reports)
    rows.append(
        f"\n{len(reports)} patients checked against {reports[0].profile_code}: {done} complete, "
        f"{len(reports) - done} with gaps. Show one in full with --patient ID."
    )
    return "\n".join(rows)
