"""Test results: the list (newest first, grouped by report, paged), one result with its trend, and
the home page's "New results"."""

from __future__ import annotations

from typing import Any

from flask import Response, request
from flask_babel import format_date
from flask_babel import lazy_gettext as _l

from gateway.portal import context, seen
from gateway.portal import results as service
from gateway.portal.web import bp, home_section, nav_item, page, services, visit

nav_item(20, "portal.results", _l("Test results"))

# Observation.interpretation codes in words: a flag is read, never told by colour alone.
FLAG_WORDS: dict[str, Any] = {
    "H": _l("High"), "L": _l("Low"), "HH": _l("Critically high"), "LL": _l("Critically low"),
    "HU": _l("Significantly high"), "LU": _l("Significantly low"), "A": _l("Abnormal"),
    "AA": _l("Critically abnormal"), ">": _l("Above the measurable range"), "<": _l("Below the measurable range"),
    "POS": _l("Positive"), "DET": _l("Detected"), "R": _l("Resistant"), "I": _l("Intermediate"),
    "IND": _l("Indeterminate"), "E": _l("Equivocal"), "W": _l("Worse"), "U": _l("Significant change up"),
    "D": _l("Significant change down"), "N": _l("Normal"), "NEG": _l("Negative"), "ND": _l("Not detected"),
    "S": _l("Susceptible"), "B": _l("Better"),
}
STATUS_WORDS: dict[str, Any] = {
    "registered": _l("Registered"), "preliminary": _l("Preliminary"), "final": _l("Final"),
    "amended": _l("Amended"), "corrected": _l("Corrected"), "unknown": _l("Unknown"),
}


@bp.app_context_processor
def _result_words() -> dict[str, Any]:
    return {"flag_words": FLAG_WORDS}


@bp.get("/results")
def results() -> Response:
    current = visit()
    cursor = request.args.get("cursor") or None
    found = service.list_results(current.record, cursor)
    opened = seen.seen_of(services().engine, current.user.id, service.references_of(found))
    for group in found.groups:
        for result in group.results:
            result.new = result.reference not in opened and service.is_recent(result.when)
    return page("results.html", found=found, cursor=cursor)


@bp.get("/results/<observation_id>")
def results_detail(observation_id: str) -> Response:
    current = visit()
    shown = service.detail(current.record, observation_id)
    was_new = shown.result.reference not in seen.seen_of(services().engine, current.user.id,
                                                         [shown.result.reference])
    seen.mark_seen(services().engine, current.user.id, [shown.result.reference])
    chart = service.chart(shown.trend, lambda moment: format_date(moment, "medium"))
    return page("results_detail.html", shown=shown, chart=chart, was_new=was_new, status_words=STATUS_WORDS,
                switch_next="/results")


@home_section(20, "home_results.html")
def new_results(current: context.Visit) -> dict[str, Any] | None:
    recent = service.recent_results(current.record)
    opened = seen.seen_of(services().engine, current.user.id, [r.reference for r in recent])
    fresh = [r for r in recent if r.reference not in opened]
    return {"count": len(fresh), "newest": fresh[:3]}
