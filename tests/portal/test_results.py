"""Test results: list (newest first, grouped by report, paged), detail (value, range, flag in words,
notes, SVG trend with a table), new until opened, and what proxies may not see."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pyotp

from tests.portal.conftest import Portal, browser_sign_in, shot, text_of
from tests.smart_auth.conftest import TOTP_SECRET


def _rows(html: str) -> list[str]:
    return re.findall(r'<tr id="result-([^"]+)"', html)


def test_the_list_is_newest_first_and_grouped_by_report(portal: Portal) -> None:
    portal.sign_in("maria")
    portal.choose("maria-garcia")
    html = portal.get("/results")
    ids = _rows(html)
    assert ids and ids[0].endswith("2026-11-10"), ids[:5]
    dates = [re.search(r"(\d{4}-\d{2}-\d{2})$", i).group(1) for i in ids if re.search(r"\d{4}-\d{2}-\d{2}$", i)]
    assert dates == sorted(dates, reverse=True)
    page = text_of(html)
    assert "Hemoglobin A1c/Hemoglobin.total in Blood · " in page  # the report's heading over its results
    assert "132 mmHg / 84 mmHg" in text_of(portal.get("/results?cursor=" + re.search(
        r'id="results-more" href="/results\?cursor=([^"]+)"', html).group(1).replace("&amp;", "&")))
    assert "▲ High" in page  # the flag in words, not by colour alone


def test_results_are_paged_without_repeats(portal: Portal) -> None:
    portal.sign_in("maria")
    portal.choose("maria-garcia")
    first = portal.get("/results")
    more = re.search(r'id="results-more" href="([^"]+)"', first)
    assert more, "maria has more results than one page"
    second = portal.get(more.group(1).replace("&amp;", "&"))
    assert set(_rows(first)).isdisjoint(_rows(second)) and _rows(second)
    assert 'id="results-first"' in second


def test_a_bad_page_cursor_gets_a_friendly_page(portal: Portal) -> None:
    portal.sign_in("daniel")
    reply = portal.client.get("/results?cursor=not-a-cursor", headers={"Accept": "text/html"})
    assert reply.status_code == 400
    body = reply.get_data(as_text=True)
    assert "Traceback" not in body and "We could not do that" in text_of(body)


def test_the_detail_shows_value_range_flag_status_and_the_care_teams_notes(portal: Portal) -> None:
    portal.sign_in("maria")
    portal.choose("maria-garcia")
    page = text_of(portal.get("/results/maria-garcia-hba1c-2026-11-10"))
    assert "6.3 %" in page and "▲ High" in page and "Final" in page
    assert "≤ 5.6 %" in page or "5.6" in page
    assert "A1c keeps improving (6.3%)" in page  # Observation.note
    assert "Hola Maria - your hemoglobin A1c from November 10 is 6.3%" in page  # the message about it
    assert "Part of: Hemoglobin A1c/Hemoglobin.total in Blood" in page


def test_the_report_conclusion_is_a_note(portal: Portal) -> None:
    portal.sign_in("daniel")
    page = text_of(portal.get("/results/daniel-garcia-tsh-2026-10-27"))
    assert "Normal thyroid function; no medical cause found for the low mood." in page
    assert "Normal" in page and "▲" not in page.split("Trend over time")[0]


def test_the_trend_chart_is_svg_with_title_desc_band_and_a_table(portal: Portal) -> None:
    portal.sign_in("maria")
    portal.choose("maria-garcia")
    html = portal.get("/results/maria-garcia-hba1c-2026-05-20")
    svg = re.search(r'<svg id="trend-chart".*?</svg>', html, re.S)
    assert svg, "no chart"
    chart = svg.group(0)
    assert 'role="img"' in chart and "<title id=\"chart-title\">Trend of Hemoglobin A1c" in chart
    assert "<desc id=\"chart-desc\">4 results from" in chart
    assert 'class="band"' in chart  # the standard range
    assert chart.count('class="point abnormal"') == 4  # every A1c was flagged high: triangles
    assert chart.count('<circle class="point"') == 0
    table = re.search(r'<table id="trend-table".*?</table>', html, re.S).group(0)
    assert table.count("<tr") == 5 and "(this result)" in table
    assert "7.4 %" in text_of(table) and "6.3 %" in text_of(table)


def test_a_mix_of_normal_and_abnormal_points_is_drawn_with_two_shapes(portal: Portal) -> None:
    portal.sign_in("maria")
    portal.choose("sofia-garcia")
    html = portal.get("/results/sofia-garcia-vitamin-d-2026-02-17")
    chart = re.search(r'<svg id="trend-chart".*?</svg>', html, re.S).group(0)
    assert chart.count('class="point abnormal"') >= 1 and chart.count('<circle class="point"') >= 1


def test_blood_pressure_has_two_series(portal: Portal) -> None:
    portal.sign_in("daniel")
    html = portal.get("/results/daniel-garcia-bp-2025-06-03")
    chart = re.search(r'<svg id="trend-chart".*?</svg>', html, re.S).group(0)
    assert chart.count("<polyline") == 2 and 'stroke-dasharray="6 4"' in chart
    assert "dashed line: Diastolic blood pressure" in text_of(html)


def test_new_until_this_login_opens_it(portal: Portal, app: Any, store: Any) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    with store.writing() as repo:
        for n in range(2):
            repo.create({"resourceType": "Observation", "id": f"fresh-{n}", "status": "final",
                         "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                                   "code": "laboratory"}]}],
                         "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}], "text": "Glucose"},
                         "subject": {"reference": "Patient/robert-chen"},
                         "effectiveDateTime": (now - timedelta(hours=n + 1)).isoformat(),
                         "valueQuantity": {"value": 101 + n, "unit": "mg/dL"}}, resource_id=f"fresh-{n}")
    portal.sign_in("robert", otp=True)
    home = portal.get("/")
    count = int(re.search(r'id="new-results-count">(\d+)<', home).group(1))
    assert count >= 2 and "Glucose" in text_of(home)
    listing = portal.get("/results")
    assert re.search(r'<tr id="result-fresh-0" class="is-new">', listing)
    detail = text_of(portal.get("/results/fresh-0"))
    assert "Glucose New" in detail  # new on the visit that opens it
    assert not re.search(r'<tr id="result-fresh-0" class="is-new">', portal.get("/results"))
    assert re.search(r'<tr id="result-fresh-1" class="is-new">', portal.last_html)
    assert int(re.search(r'id="new-results-count">(\d+)<', portal.get("/")).group(1)) == count - 1
    # per login: Linda, who acts for Robert, still sees it as new
    other = Portal(app.test_client(), portal.world)
    other.sign_in("linda")
    other.choose("robert-chen")
    assert re.search(r'<tr id="result-fresh-0" class="is-new">', other.get("/results"))


def test_a_teens_confidential_results_never_reach_the_parent(portal: Portal, app: Any) -> None:
    portal.sign_in("maria")
    portal.choose("daniel-garcia")
    listing = portal.get("/results")
    assert "daniel-garcia-tsh-2026-10-27" not in listing and "daniel-garcia-hemoglobin-2026-10-27" not in listing
    assert "daniel-garcia-ferritin-2026-06-16" in listing  # not confidential: shown
    reply = portal.client.get("/results/daniel-garcia-tsh-2026-10-27", headers={"Accept": "text/html"})
    assert reply.status_code == 404 and "Thyrotropin" not in reply.get_data(as_text=True)
    detail = text_of(portal.get("/results/daniel-garcia-hemoglobin-2025-06-03"))
    assert "2026-10-27" not in detail and "Oct 27, 2026" not in detail  # nor in the trend
    assert "Normal thyroid function" not in text_of(portal.get("/"))
    teen = Portal(app.test_client(), portal.world)
    teen.sign_in("daniel")
    assert "daniel-garcia-tsh-2026-10-27" in teen.get("/results")
    assert "Oct 27, 2026" in text_of(teen.get("/results/daniel-garcia-hemoglobin-2025-06-03"))


def test_no_one_reads_another_familys_results(portal: Portal) -> None:
    portal.sign_in("maria")
    portal.choose("sofia-garcia")
    for path in ("/results/robert-chen-hba1c-2026-09-15", "/results/maria-garcia-hba1c-2026-11-10",
                 "/results/no-such-result"):
        reply = portal.client.get(path, headers={"Accept": "text/html"})
        assert reply.status_code == 404, path
    assert "robert-chen" not in portal.get("/results")


def test_an_ended_relationship_shows_no_results(portal: Portal, world: Any) -> None:
    portal.sign_in("linda")
    portal.choose("robert-chen")
    assert "robert-chen-" in portal.get("/results")
    world.smart.revoke_proxy("linda", "robert-chen")
    listing = portal.get("/results")
    assert "robert-chen-" not in listing and "You are viewing your own record." in text_of(listing)
    portal.sign_in("former")
    reply = portal.client.get("/results/robert-chen-bp-2026-09-15", headers={"Accept": "text/html"})
    assert reply.status_code == 404


def test_browser_results_as_parent_and_caregiver(browser: Any) -> None:
    page = browser
    browser_sign_in(page, "maria")
    page.check("#pick-sofia-garcia")
    page.click("#record-picker button[type=submit]")
    page.wait_for_selector("#home-results")
    shot(page, "results-home-child")
    page.click("nav a[href='/results']")
    page.wait_for_selector("#results-table")
    shot(page, "results-list-child")
    page.click("#results-table a >> nth=0")
    page.wait_for_selector("#result-values")
    shot(page, "results-detail-child")
    page.select_option("#switch-patient", "Patient/daniel-garcia")
    page.click("#record-switcher button[type=submit]")
    page.wait_for_selector("#results-table")
    assert "daniel-garcia-tsh-2026-10-27" not in page.content()  # the teen's confidential result
    shot(page, "results-list-teen")
    page.set_viewport_size({"width": 375, "height": 800})
    page.click("#results-table a >> nth=0")
    page.wait_for_selector("#trend-table")
    shot(page, "results-detail-teen-phone")


def test_browser_results_as_older_adult(browser: Any) -> None:
    page = browser
    browser_sign_in(page, "robert")
    page.fill("#mfa-form input[name=otp]", pyotp.TOTP(TOTP_SECRET).now())
    page.click("#mfa-form button[type=submit]")
    page.wait_for_selector("#whose-record")
    page.goto("/results")
    page.wait_for_selector("#results-table")
    shot(page, "results-list-adult")
    page.goto("/results/robert-chen-hba1c-2026-09-15")
    shot(page, "results-detail-adult")
    page.set_viewport_size({"width": 375, "height": 800})
    shot(page, "results-detail-adult-phone")


def test_an_hl7_result_with_a_note_for_the_patient_shows_the_note_and_tells_the_patient(portal: Portal,
                                                                                        app: Any) -> None:
    from sqlalchemy import select

    from gateway.portal.models import portal_notification
    from gateway.smart_auth import people
    from tests.smart_auth.conftest import PASSWORD

    services = app.extensions["gateway"]
    people.add_user(services.engine, "jane", PASSWORD, "Patient/HOSP-MRN123")
    now = datetime.now(UTC) - timedelta(hours=2)
    stamp = now.strftime("%Y%m%d%H%M%S+0000")
    er7 = "\r".join([
        f"MSH|^~\\&|LAB|HOSP|GW|HOSP|{stamp}||ORU^R01^ORU_R01|CTRL-NOTE-1|P|2.5.1",
        "PID|1||MRN123^^^HOSP^MR||Doe^Jane^Q||19800101|F|||||^NET^Internet^jane@example.org",
        f"OBR|1|PLC1^EHR|FIL1^LAB|24331-1^Lipid panel^LN|||{stamp}|||||||||||||||{stamp}|||F",
        f"OBX|1|NM|2345-7^Glucose^LN||187|mg/dL|70-99|H|||F|||{stamp}",
        "NTE|1|L|Please repeat this test after fasting.|PI^Patient Instructions^HL70364",
    ]) + "\r"
    services.hl7.receive(er7, "test", None)
    portal.sign_in("jane")
    listing = portal.get("/results")
    [observation_id] = _rows(listing)
    page = text_of(portal.get(f"/results/{observation_id}"))
    assert "187 mg/dL" in page and "70 - 99" in page.replace("70-99", "70 - 99") and "▲ High" in page
    assert page.count("Please repeat this test after fasting.") >= 1
    with services.engine.connect() as conn:
        rows = conn.execute(select(portal_notification)).all()
    assert [(r.event, r.address) for r in rows] == [("new-result", "jane@example.org")]
