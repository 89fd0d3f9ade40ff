"""Issue 13 in headless Chromium: the app inside the EHR's own page, one session per launch, and a review
page a clinician reads in five seconds.

The EHR's chart page is opened on ``http://localhost:PORT`` and frames the EHR and the app on
``http://127.0.0.1:...``: a cross-site frame, as Epic, PowerChart and athena show SMART apps.  Drafts
are counted on HAPI.  Screenshots go to ``test-artifacts/screenshots/`` (git-ignored; the README names
it); axe-core runs the WCAG 2.2 AA rules on every app page at 1280 and 390 px.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import pytest
from test_smart_e2e import _drafts_in_hapi

from fhir_plugin.synthetic import generate_cases
from sandbox.testing import (
    CHROMIUM,
    forget_folded_drafts,
    headless_chromium,
    load_fresh_case,
    needing_drafts,
    sandbox_stack,
)

REPO = Path(__file__).resolve().parent.parent
SHOTS = REPO / "test-artifacts" / "screenshots"
WCAG22_AA = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "wcag22aa"]
FIRST_SCREEN = 900  # px: what a clinician sees without scrolling

pytestmark = [pytest.mark.server, pytest.mark.browser]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium", pytrace=False)
    SHOTS.mkdir(parents=True, exist_ok=True)
    with headless_chromium() as chromium:
        yield chromium


def _fresh(fhir_base_url: str, key: str):
    case = next(c for c in generate_cases(dt.date.today()) if c.key == key)
    case = load_fresh_case(fhir_base_url, case)
    encounters = sorted(
        (r for r in case.resources if r["resourceType"] == "Encounter"), key=lambda r: r["period"]["start"]
    )
    return case.patient_id, encounters[-1]["id"]


def _app_frame(page, app_url: str):
    """The app's frame inside the EHR's chart page, once its review page is there."""
    page.wait_for_selector("iframe.app")
    for _ in range(200):
        frame = next((f for f in page.frames if f.url.startswith(app_url + "/review")), None)
        if frame is not None:
            frame.wait_for_selector("#summary")
            return frame
        page.wait_for_event("framenavigated", timeout=15000)
    raise AssertionError("the app's review page never loaded in the EHR's frame")


def _within_first_screen(locator) -> bool:
    box = locator.bounding_box()
    return box is not None and box["y"] + box["height"] <= FIRST_SCREEN


def _serious(page) -> list[str]:
    from axe_playwright_python.sync_playwright import Axe

    results = Axe().run(page, options={"runOnly": {"type": "tag", "values": WCAG22_AA}, "resultTypes": ["violations"]})
    return [
        f"{v['id']} ({v['impact']}): {len(v['nodes'])} nodes, e.g. {v['nodes'][0]['target']}"
        for v in results.response["violations"]
        if v.get("impact") in ("serious", "critical")
    ]


# ---------------------------------------------------------------- embedded: launch, review, confirm, write


def test_launch_review_and_write_inside_a_cross_site_ehr_frame(fhir_base_url, browser):
    pid, encounter = _fresh(fhir_base_url, "missing-treatment-plan")
    with sandbox_stack(fhir_base_url) as stack:
        assert stack.chart_origin.split("//")[1].split(":")[0] != stack.app_url.split("//")[1].split(":")[0]
        context = browser.new_context(viewport={"width": 1280, "height": FIRST_SCREEN})
        page = context.new_page()
        set_cookies: list[str] = []
        page.on(
            "response",
            lambda r: (
                set_cookies.extend(h["value"] for h in r.headers_array() if h["name"].lower() == "set-cookie")
                if r.url.startswith(stack.app_url)
                else None
            ),
        )
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

        page.goto(stack.chart_url(pid, encounter))
        assert page.url.startswith("http://localhost:")  # the top-level page is the EHR's, on another site
        frame = _app_frame(page, stack.app_url)
        assert f"Patient/{pid}" in frame.locator("#summary").inner_text()

        # the cookie the frame kept: the only kind a browser keeps for a cross-site frame
        ours = [c for c in set_cookies if c.startswith("fp_sid")]
        assert ours and all(
            "SameSite=None" in c and "Secure" in c and "Partitioned" in c and "HttpOnly" in c for c in ours
        )
        # the write button is on the first screen, under the verdict
        assert _within_first_screen(frame.locator("#verdict")) and _within_first_screen(frame.locator("#write-button"))
        page.screenshot(path=str(SHOTS / "embedded-review.png"))

        assert _drafts_in_hapi(fhir_base_url, pid) == {"Condition": 0, "Goal": 0, "CarePlan": 0}
        frame.click("#write-button")
        frame.wait_for_selector("#confirm-write")
        frame.click("#confirm-write")
        frame.wait_for_selector("#write-result")
        page.screenshot(path=str(SHOTS / "embedded-written.png"))
        # SPEC §7.1: the record's confirmed Condition is used, so the plan and its four goals are written
        assert _drafts_in_hapi(fhir_base_url, pid) == {"Condition": 0, "Goal": 4, "CarePlan": 1}
        assert frame.locator("#created li").count() == 6
        created = frame.locator("#created a")  # each resource of the patient's is a link to the viewer
        assert created.count() == 5 and all(
            created.nth(i).get_attribute("href").startswith("/resource/") for i in range(created.count())
        )

        # back on the review: what was written, with links, and nothing to write again
        frame.click("text=Back to the review")
        frame.wait_for_selector("#already-written")
        assert frame.locator("#write-button").count() == 0
        assert frame.locator("#write ul.written-list a").count() == 5  # the plan and its goals, as read back
        page.screenshot(path=str(SHOTS / "review-after-write.png"))
        assert errors == []
        context.close()


# ---------------------------------------------------------------- one session per launch


def test_two_tabs_two_patients_each_writes_to_its_own(fhir_base_url, browser):
    a, enc_a = _fresh(fhir_base_url, "missing-treatment-plan")
    b, enc_b = _fresh(fhir_base_url, "missing-treatment-plan")
    with sandbox_stack(fhir_base_url) as stack:
        context = browser.new_context(viewport={"width": 1280, "height": FIRST_SCREEN})
        tab_a, tab_b = context.new_page(), context.new_page()
        tab_a.goto(stack.chart_url(a, enc_a))
        frame_a = _app_frame(tab_a, stack.app_url)
        tab_b.goto(stack.chart_url(b, enc_b))
        frame_b = _app_frame(tab_b, stack.app_url)

        # a reload of tab A's app, after B was launched in the same browser, still shows A
        tab_a.bring_to_front()
        frame_a.goto(frame_a.url)
        frame_a.wait_for_selector("#summary")
        text_a, text_b = frame_a.locator("main").inner_text(), frame_b.locator("main").inner_text()
        assert f"Patient/{a}" in text_a and f"Patient/{b}" not in text_a
        assert f"Patient/{b}" in text_b and f"Patient/{a}" not in text_b

        # tab A writes first (after B's launch), then tab B: each to its own patient
        for name, frame in (("a", frame_a), ("b", frame_b)):
            (tab_a if name == "a" else tab_b).bring_to_front()  # the clinician switches to that tab
            frame.click("#write-button")
            frame.click("#confirm-write")
            frame.wait_for_selector("#write-result")
        assert f"Patient/{a}" in frame_a.locator("#write-result").inner_text()
        assert f"Patient/{b}" in frame_b.locator("#write-result").inner_text()
        assert _drafts_in_hapi(fhir_base_url, a) == {"Condition": 0, "Goal": 4, "CarePlan": 1}
        assert _drafts_in_hapi(fhir_base_url, b) == {"Condition": 0, "Goal": 4, "CarePlan": 1}
        context.close()


# ---------------------------------------------------------------- five seconds: first screen, keyboard, axe

STATES = [  # (screenshot name, case, read-only launch)
    ("review-writable", "missing-treatment-plan", False),
    ("review-mismatch", "clinical-example", False),
    ("review-red-flag", "flag-neuro", False),
    ("review-complete", "complete", False),
    ("review-read-only", "missing-onset", True),
]


@pytest.mark.parametrize("width", [1280, 390])
def test_every_app_page_passes_wcag22_aa_and_the_first_screen_holds_the_verdict_and_action(
    fhir_base_url, browser, width
):
    problems: list[str] = []
    for name, key, read_only in STATES:
        pid, encounter = _fresh(fhir_base_url, key)
        with sandbox_stack(fhir_base_url, read_only=read_only) as stack:
            context = browser.new_context(viewport={"width": width, "height": FIRST_SCREEN})
            page = context.new_page()
            page.goto(stack.launch_url(pid, encounter))
            page.wait_for_selector("#summary")
            suffix = "" if width == 1280 else f"-{width}"
            page.screenshot(path=str(SHOTS / f"{name}{suffix}.png"))
            page.screenshot(path=str(SHOTS / f"{name}{suffix}-full.png"), full_page=True)
            # the first screen: the verdict and the action (the button, or why there is none)
            assert _within_first_screen(page.locator("#verdict")), name
            action = page.locator("#write-button, #read-only, #drafts-refused, #nothing-new, #already-written").first
            assert _within_first_screen(action), name
            if key == "flag-neuro":
                assert page.locator("#verdict").inner_text().startswith("Refer first")
            if read_only:
                assert page.locator("#read-only").count() == 1 and page.locator("#write-button").count() == 0
            if key == "clinical-example":
                assert page.locator("#alternatives a", has_text="M62.830").count() == 1
            problems += [f"{name} review @{width}: {v}" for v in _serious(page)]
            if key == "missing-treatment-plan":
                # keyboard only: Write within 5 Tab presses from the top of the page
                page.goto(page.url)
                page.wait_for_selector("#write-button")
                for _ in range(5):
                    page.keyboard.press("Tab")
                    if page.evaluate("document.activeElement && document.activeElement.id") == "write-button":
                        break
                assert page.evaluate("document.activeElement.id") == "write-button", "Write not reached in 5 Tabs"
                # the other pages of the app: the evidence viewer, confirm, written, an error page, home
                page.click("#group-met > summary")
                page.locator("#group-met a.ev").first.click()
                page.wait_for_selector("#resource-facts")
                problems += [f"resource @{width}: {v}" for v in _serious(page)]
                page.go_back()
                page.click("#write-button")
                page.wait_for_selector("#confirm-write")
                problems += [f"confirm @{width}: {v}" for v in _serious(page)]
                page.click("#confirm-write")
                page.wait_for_selector("#write-result")
                page.screenshot(path=str(SHOTS / f"written{suffix}.png"))
                problems += [f"written @{width}: {v}" for v in _serious(page)]
                page.goto(f"{stack.app_url}/review?launch=")
                page.wait_for_selector(".refusal")
                page.screenshot(path=str(SHOTS / f"error{suffix}.png"))
                problems += [f"error @{width}: {v}" for v in _serious(page)]
                page.goto(f"{stack.app_url}/")
                problems += [f"home @{width}: {v}" for v in _serious(page)]
            context.close()
    assert problems == []


def test_the_mismatch_offers_the_review_under_the_suggested_code_that_ships(fhir_base_url, browser):
    pid, encounter = _fresh(fhir_base_url, "clinical-example")
    with sandbox_stack(fhir_base_url) as stack:
        context = browser.new_context(viewport={"width": 1280, "height": FIRST_SCREEN})
        page = context.new_page()
        page.goto(stack.launch_url(pid, encounter))
        page.wait_for_selector("#alternatives")
        shipped = page.locator("#alternatives a.button")
        codes = [shipped.nth(i).inner_text().split()[-1] for i in range(shipped.count())]
        assert codes, "no suggested code with a shipped profile"
        shipped.first.click()
        page.wait_for_selector("#summary")
        assert f"code={codes[0]}" in page.url and "launch=" in page.url
        assert codes[0] in page.locator(".eyebrow").inner_text()
        page.screenshot(path=str(SHOTS / f"review-under-{codes[0]}.png"))
        context.close()


def test_trends_are_inline_svg_with_a_table(fhir_base_url, browser):
    pid, encounter = _fresh(fhir_base_url, "missing-treatment-plan")
    with sandbox_stack(fhir_base_url) as stack:
        context = browser.new_context(viewport={"width": 1280, "height": FIRST_SCREEN})
        page = context.new_page()
        page.goto(stack.launch_url(pid, encounter))
        page.wait_for_selector("#trends")
        circumference = page.locator("#trend-circumference")
        assert circumference.locator("svg polyline, svg circle").count() >= 2
        cells = circumference.locator("table td").all_inner_texts()
        assert "34.5 cm" in cells and "35 cm" in cells and "right" in cells  # the record's own numbers
        assert page.locator("#trend-pain table tbody tr").count() >= 2
        page.locator("#trends").screenshot(path=str(SHOTS / "trends.png"))
        context.close()


@pytest.mark.parametrize("width", [1280, 390])
@pytest.mark.parametrize("personality", ["epic-like", "oracle-like"])
def test_the_pages_of_a_folded_write_pass_wcag22_aa_on_each_ehr_personality(
    fhir_base_url, browser, tmp_path, personality, width
):
    """Issue 12's pages as a clinician sees them on an EHR without CarePlan create: the review, the
    confirmation, the result naming the plan written as a note, and a new launch that offers nothing
    (SPEC §7.1) — each with the verdict and the action on the first screen, and no serious axe finding."""
    chart = next(c for c in generate_cases(dt.date.today()) if c.key == "missing-onset")
    case = load_fresh_case(fhir_base_url, dataclasses.replace(chart, resources=needing_drafts(chart.resources)))
    suffix = "" if width == 1280 else f"-{width}"
    problems: list[str] = []
    with sandbox_stack(fhir_base_url, personality=personality, ledger_store=str(tmp_path / "ledger.sqlite")) as stack:
        for step in ("first", "again"):
            context = browser.new_context(viewport={"width": width, "height": FIRST_SCREEN})
            page = context.new_page()
            page.goto(stack.launch_url(case.patient_id))
            page.wait_for_selector("#summary")
            page.screenshot(path=str(SHOTS / f"{personality}-review-{step}{suffix}.png"))
            assert _within_first_screen(page.locator("#verdict")), step
            action = page.locator("#write-button, #read-only, #drafts-refused, #nothing-new, #already-written").first
            assert _within_first_screen(action), step
            problems += [f"{personality} review ({step}) @{width}: {v}" for v in _serious(page)]
            if step == "first":
                page.click("#write-button")
                page.wait_for_selector("#confirm-write")
                problems += [f"{personality} confirm @{width}: {v}" for v in _serious(page)]
                page.click("#confirm-write")
                page.wait_for_selector("#write-result")
                page.screenshot(path=str(SHOTS / f"{personality}-written{suffix}.png"), full_page=True)
                assert "note" in page.locator("#write-result").inner_text().lower()  # the plan's form is named
                problems += [f"{personality} written @{width}: {v}" for v in _serious(page)]
            else:
                assert page.locator("#write-button").count() == 0  # SPEC §7.1: nothing new is offered
                # the plan note it names opens in the app's resource viewer
                page.locator(".written-list a", has_text="Plan of care note").first.click()
                page.wait_for_selector("#resource-facts")
                page.screenshot(path=str(SHOTS / f"{personality}-plan-note{suffix}.png"), full_page=True)
                problems += [f"{personality} plan note @{width}: {v}" for v in _serious(page)]
            context.close()
    forget_folded_drafts(fhir_base_url, case.patient_id)
    assert problems == []
