"""Sharing: who may act for a record, whose records a login acts for, and an adult granting and
revoking caregivers on their own record."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

from gateway.smart_auth import people
from tests.portal.conftest import Portal, text_of


def _grant(portal: Portal, **fields: str) -> Any:
    data = {"username": "daniel", "relationship": "FRND", "until": "", **fields}
    return portal.post("/sharing/grant", data, page="/sharing")


def test_an_adult_sees_who_has_access_and_grants_and_revokes(portal: Portal, world: Any) -> None:
    portal.sign_in("robert", otp=True)
    page = text_of(portal.get("/sharing"))
    assert "Who has access to your record" in page
    assert "Linda Mei Chen (linda)" in page and "Son or daughter" in page
    assert "former" not in page  # the caregiver whose access ended is not listed
    until = (date.today() + timedelta(days=30)).isoformat()
    reply = _grant(portal, username="maria", relationship="FRND", until=until)
    assert reply.status_code == 200, text_of(portal.last_html)
    page = text_of(portal.last_html)
    assert "Access granted." in page and "(maria)" in page and "Friend" in page
    with world.smart.engine.connect() as conn:
        maria = people.find_user(world.smart.engine, "maria")
        assert maria is not None and "robert-chen" in people.acting_for(conn, maria.id)
    reply = portal.post("/sharing/revoke", {"username": "linda"}, page="/sharing")
    assert reply.status_code == 200 and "Access ended." in text_of(portal.last_html)
    assert "(linda)" not in text_of(portal.last_html)
    linda = people.find_user(world.smart.engine, "linda")
    with world.smart.engine.connect() as conn:
        assert linda is not None and "robert-chen" not in people.acting_for(conn, linda.id)


def test_a_parent_sees_whose_records_she_acts_for_with_end_dates(portal: Portal) -> None:
    portal.sign_in("maria")
    portal.choose("maria-garcia")
    page = text_of(portal.get("/sharing"))
    assert "Sofia Isabel Garcia" in page and "Daniel Jose Garcia" in page and "Mother" in page
    # The day before the 18th birthday (Sofia: 2018-02-14, Daniel: 2011-05-10).
    assert "Feb 13, 2036" in page and "May 9, 2029" in page
    assert "Confidential information for a teen stays hidden." in page
    assert "stays hidden from parents" in page


def test_a_parent_cannot_grant_on_a_childs_record(portal: Portal) -> None:
    portal.sign_in("maria")
    portal.choose("sofia-garcia")
    page = text_of(portal.get("/sharing"))
    assert "grant-form" not in portal.last_html and "please contact the office" in page
    assert "Maria Elena Garcia" in page  # who has access to Sofia's record
    reply = _grant(portal, username="linda")
    assert reply.status_code == 400 and "set up by the practice" in text_of(portal.last_html)
    reply = portal.post("/sharing/revoke", {"username": "maria"}, page="/sharing")
    assert reply.status_code == 400
    with portal.world.smart.engine.connect() as conn:
        maria = people.find_user(portal.world.smart.engine, "maria")
        assert maria is not None and "sofia-garcia" in people.acting_for(conn, maria.id)


def test_a_proxy_sees_the_sharing_page_but_cannot_grant(portal: Portal) -> None:
    portal.sign_in("linda")
    portal.choose("robert-chen")
    page = text_of(portal.get("/sharing"))
    assert "Who has access to the record of Robert Chen" in page and "Linda Mei Chen (linda)" in page
    assert "grant-form" not in portal.last_html and "You are acting for someone else." in page
    reply = _grant(portal, username="maria")
    assert reply.status_code == 400 and "You are acting for someone else." in text_of(portal.last_html)
    reply = portal.post("/sharing/revoke", {"username": "linda"}, page="/sharing")
    assert reply.status_code == 400
    portal.post("/switch", {"patient": "Patient/linda-chen", "next": "/sharing"}, page="/sharing")
    page = text_of(portal.last_html)
    assert "Records you can act for" in page and "Robert Chen" in page and "No end date" in page


def test_an_ended_caregiver_has_no_access(portal: Portal) -> None:
    portal.sign_in("former")
    page = text_of(portal.get("/sharing"))
    assert "You do not act for anyone else." in page and "Robert" not in page
    reply = portal.post("/switch", {"patient": "Patient/robert-chen", "next": "/sharing"}, page="/sharing")
    assert reply.status_code == 400


def test_grant_refuses_an_empty_username(portal: Portal) -> None:
    portal.sign_in("robert", otp=True)
    reply = _grant(portal, username="")
    assert reply.status_code == 400 and "Enter the caregiver's username." in text_of(portal.last_html)


def test_grant_refuses_a_too_long_username(portal: Portal) -> None:
    portal.sign_in("robert", otp=True)
    reply = _grant(portal, username="x" * 65)
    assert reply.status_code == 400 and "at most 64 characters" in text_of(portal.last_html)


def test_grant_refuses_an_unknown_username(portal: Portal) -> None:
    portal.sign_in("robert", otp=True)
    reply = _grant(portal, username="nobody-here")
    assert reply.status_code == 400 and "There is no login with that username." in text_of(portal.last_html)


def test_grant_refuses_yourself(portal: Portal) -> None:
    portal.sign_in("robert", otp=True)
    reply = _grant(portal, username="robert")
    assert reply.status_code == 400 and "You cannot give access to yourself." in text_of(portal.last_html)


def test_grant_refuses_a_date_in_the_past(portal: Portal) -> None:
    portal.sign_in("robert", otp=True)
    reply = _grant(portal, until=(date.today() - timedelta(days=1)).isoformat())
    assert reply.status_code == 400 and "cannot be in the past" in text_of(portal.last_html)


def test_grant_refuses_a_date_that_is_not_a_date(portal: Portal) -> None:
    portal.sign_in("robert", otp=True)
    reply = _grant(portal, until="next tuesday")
    assert reply.status_code == 400 and "as a date" in text_of(portal.last_html)


def test_grant_refuses_a_relationship_not_listed(portal: Portal) -> None:
    portal.sign_in("robert", otp=True)
    reply = _grant(portal, relationship="BOSS")
    assert reply.status_code == 400 and "Choose one of the relationships listed." in text_of(portal.last_html)


def test_grant_refuses_a_duplicate(portal: Portal) -> None:
    portal.sign_in("robert", otp=True)
    reply = _grant(portal, username="linda", relationship="CHILD")
    assert reply.status_code == 400 and "already has access" in text_of(portal.last_html)


def test_grant_refuses_from_a_teens_own_record(portal: Portal) -> None:
    portal.sign_in("daniel")
    reply = _grant(portal, username="linda")
    assert reply.status_code == 400 and "set up by the practice" in text_of(portal.last_html)


def test_revoke_refuses_someone_without_access(portal: Portal) -> None:
    portal.sign_in("robert", otp=True)
    reply = portal.post("/sharing/revoke", {"username": "maria"}, page="/sharing")
    assert reply.status_code == 400 and "does not have access" in text_of(portal.last_html)


def test_revoke_refuses_an_empty_username(portal: Portal) -> None:
    portal.sign_in("robert", otp=True)
    reply = portal.post("/sharing/revoke", {"username": ""}, page="/sharing")
    assert reply.status_code == 400


def test_sharing_forms_refuse_a_missing_csrf_token(portal: Portal) -> None:
    portal.sign_in("robert", otp=True)
    reply = portal.client.post("/sharing/revoke", data={"username": "linda"}, headers={"Accept": "text/html"})
    assert reply.status_code == 400
    linda = people.find_user(portal.world.smart.engine, "linda")
    with portal.world.smart.engine.connect() as conn:
        assert linda is not None and "robert-chen" in people.acting_for(conn, linda.id)
