"""Concurrent writers over real HTTP (threaded server): conditional creates, If-Match, plain updates."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

pytestmark = pytest.mark.slow

HEADERS = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
SYSTEM = "urn:test:mrn"
TIMEOUT = 60


def parallel(count: int, call: Callable[[int], requests.Response]) -> list[requests.Response]:
    """Run call(0..count-1) at once: every thread waits at a barrier, then sends."""
    barrier = threading.Barrier(count)

    def run(i: int) -> requests.Response:
        barrier.wait(timeout=TIMEOUT)
        return call(i)

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(run, range(count)))


def create_patient(base: str, **fields: Any) -> dict[str, Any]:
    response = requests.post(f"{base}/fhir/Patient", json={"resourceType": "Patient", **fields}, headers=HEADERS,
                             timeout=TIMEOUT)
    assert response.status_code == 201, response.text
    return response.json()


def instance_history(base: str, pid: str) -> list[dict[str, Any]]:
    response = requests.get(f"{base}/fhir/Patient/{pid}/_history?_count=1000", headers=HEADERS, timeout=TIMEOUT)
    assert response.status_code == 200
    return [e["resource"] for e in response.json()["entry"]]


def test_parallel_conditional_creates_make_one_resource(live_server: str) -> None:
    identifier = [{"system": SYSTEM, "value": "race-1"}]

    def create(i: int) -> requests.Response:
        return requests.post(
            f"{live_server}/fhir/Patient", timeout=TIMEOUT,
            json={"resourceType": "Patient", "identifier": identifier, "name": [{"family": f"Racer{i}"}]},
            headers={**HEADERS, "If-None-Exist": f"identifier={SYSTEM}|race-1"},
        )

    responses = parallel(10, create)
    assert sorted(r.status_code for r in responses) == [200] * 9 + [201], [r.text for r in responses]
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 1
    assert all(r.json()["meta"]["versionId"] == "1" for r in responses)
    search = requests.get(f"{live_server}/fhir/Patient?identifier={SYSTEM}|race-1", headers=HEADERS,
                          timeout=TIMEOUT).json()
    assert [e["resource"]["id"] for e in search["entry"]] == list(ids)


def test_parallel_if_match_updates_one_wins(live_server: str) -> None:
    pid = create_patient(live_server)["id"]

    def update(i: int) -> requests.Response:
        body = {"resourceType": "Patient", "id": pid, "name": [{"family": f"Writer{i}"}]}
        return requests.put(f"{live_server}/fhir/Patient/{pid}", json=body, timeout=TIMEOUT,
                            headers={**HEADERS, "If-Match": 'W/"1"'})

    responses = parallel(10, update)
    codes = Counter(r.status_code for r in responses)
    assert codes == {200: 1, 412: 9}, [r.text for r in responses]
    (winner,) = [r for r in responses if r.status_code == 200]
    assert all(r.json()["resourceType"] == "OperationOutcome" for r in responses if r.status_code == 412)
    history = instance_history(live_server, pid)
    assert [h["meta"]["versionId"] for h in history] == ["2", "1"]
    assert history[0]["name"] == winner.json()["name"]


def test_parallel_plain_updates_all_succeed_without_gaps(live_server: str) -> None:
    pid = create_patient(live_server)["id"]

    def update(i: int) -> requests.Response:
        body = {"resourceType": "Patient", "id": pid, "name": [{"family": f"Writer{i}"}]}
        return requests.put(f"{live_server}/fhir/Patient/{pid}", json=body, headers=HEADERS, timeout=TIMEOUT)

    responses = parallel(20, update)
    assert [r.status_code for r in responses] == [200] * 20, [r.text for r in responses if r.status_code != 200]
    served = sorted(int(r.json()["meta"]["versionId"]) for r in responses)
    assert served == list(range(2, 22))
    assert sorted(r.headers["ETag"] for r in responses) == sorted(f'W/"{v}"' for v in range(2, 22))
    history = instance_history(live_server, pid)
    assert [int(h["meta"]["versionId"]) for h in history] == list(range(21, 0, -1))
    writers = Counter(h["name"][0]["family"] for h in history[:-1])
    assert writers == Counter(f"Writer{i}" for i in range(20))
    current = requests.get(f"{live_server}/fhir/Patient/{pid}", headers=HEADERS, timeout=TIMEOUT)
    assert current.headers["ETag"] == 'W/"21"'
    assert current.json() == history[0]


def test_parallel_conditional_updates_make_one_resource(live_server: str) -> None:
    def upsert(i: int) -> requests.Response:
        body = {"resourceType": "Patient", "identifier": [{"system": SYSTEM, "value": "race-2"}],
                "name": [{"family": f"Upserter{i}"}]}
        return requests.put(f"{live_server}/fhir/Patient?identifier={SYSTEM}|race-2", json=body, headers=HEADERS,
                            timeout=TIMEOUT)

    responses = parallel(10, upsert)
    assert sorted(r.status_code for r in responses) == [200] * 9 + [201], [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1


def test_parallel_transaction_conditional_updates_make_one_resource(live_server: str) -> None:
    def upsert(i: int) -> requests.Response:
        body = {"resourceType": "Patient", "identifier": [{"system": SYSTEM, "value": "race-3"}],
                "name": [{"family": f"Upserter{i}"}]}
        transaction = {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": body, "request": {"method": "PUT", "url": f"Patient?identifier={SYSTEM}|race-3"}}]}
        return requests.post(f"{live_server}/fhir", json=transaction, headers=HEADERS, timeout=TIMEOUT)

    responses = parallel(10, upsert)
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    locations = {r.json()["entry"][0]["response"]["location"].split("/_history")[0] for r in responses}
    assert len(locations) == 1
