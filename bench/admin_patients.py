#!/usr/bin/env python3
"""The front desk's patient lookup and patient page over a large patient population.

    python bench/admin_patients.py                          # 20,000 patients on a fresh SQLite file
    python bench/admin_patients.py --patients 50000 --database-url postgresql://postgres@127.0.0.1:5432/gw_x

Stores `--patients` generated Patients (names drawn from 40 family and 40 given names, so a family
name matches about 1 in 40; birth dates over 90 years; one MRN each) plus the demo family with its
logins and proxies, then times the console's services in process, as a front-desk login calls them
(gateway.admin.patients, through the access policy and with every read audited): lookups by MRN, by
full name, by family name alone (hundreds of matches, the first 25 shown), by birth date, by family
name and birth date, and the patient page of a patient with logins, codes and proxies. Prints p50
and p95 per kind over `--rounds` calls. The database must be empty or new (a PostgreSQL URL must
name a database that exists; its tables are created).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway import access, build_services, db
from gateway.admin import patients
from gateway.config import Settings

FAMILIES = (
    "Smith", "Johnson", "Williams", "Brown", "Jones", "Miller", "Davis", "Wilson", "Anderson", "Taylor",
    "Thomas", "Moore", "Martin", "Jackson", "Thompson", "White", "Lopez", "Lee", "Gonzalez", "Harris", "Clark",
    "Lewis", "Robinson", "Walker", "Perez", "Hall", "Young", "Allen", "Sanchez", "Wright", "King", "Scott",
    "Green", "Baker", "Adams", "Nelson", "Hill", "Ramirez", "Campbell", "Mitchell",
)
GIVEN = (
    "James", "Mary", "Robert", "Patricia", "John", "Jennifer", "Michael", "Linda", "David", "Elizabeth",
    "William", "Barbara", "Richard", "Susan", "Joseph", "Jessica", "Thomas", "Sarah", "Charles", "Karen",
    "Daniel", "Lisa", "Matthew", "Nancy", "Anthony", "Betty", "Mark", "Sandra", "Donald", "Ashley", "Steven",
    "Emily", "Paul", "Donna", "Andrew", "Michelle", "Joshua", "Carol", "Kenneth", "Amanda",
)


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def patient(i: int, rng: random.Random) -> dict[str, Any]:
    born = date(1935, 1, 1) + timedelta(days=rng.randrange(90 * 365))
    return {"resourceType": "Patient", "id": f"bench-{i}", "birthDate": born.isoformat(),
            "gender": rng.choice(("female", "male")),
            "identifier": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                                 "code": "MR"}]},
                            "system": "urn:oid:2.16.840.1.113883.3.4242.1.1", "value": f"BM{i:07d}"}],
            "name": [{"use": "official", "family": rng.choice(FAMILIES), "given": [rng.choice(GIVEN)]}],
            "telecom": [{"system": "email", "value": f"patient{i}@example.org"}]}


def load(services: Any, count: int) -> list[dict[str, Any]]:
    from gateway.fhir.bundles import BundleProcessor, import_file
    from gateway.smart_auth.admin import load_demo_logins

    rng = random.Random(7)
    made = [patient(i, rng) for i in range(count)]
    started = time.perf_counter()
    for start in range(0, count, 500):
        with services.store.writing(durable=False) as repo:
            for resource in made[start:start + 500]:
                repo.update("Patient", resource["id"], resource, None)
    fixtures = Path(__file__).resolve().parents[1] / "fixtures" / "fhir"
    for name in ("00-organization.json", "10-garcia-family.json", "20-chen-family.json"):
        import_file(BundleProcessor(services.store), str(fixtures / name))
    load_demo_logins(services.engine, services.store, services.settings.base_url)
    db.analyze(services.engine)  # what a running gateway's Analyzer does once the store has grown
    print(f"stored {count} patients in {time.perf_counter() - started:.1f} s", flush=True)
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="gw_bench_desk_")
    url = args.database_url or f"sqlite:///{folder}/gateway.sqlite"
    engine = db.make_engine(url)
    db.upgrade(engine)
    engine.dispose()
    settings = Settings.from_env(environ={}, database_url=url, base_url="http://127.0.0.1:8080",
                                 instance_path=folder, secret_key="bench")
    services = build_services(settings)
    made = load(services, args.patients)
    desk = access.principal_for_staff(username="bench-desk", roles={"front-desk"})
    rng = random.Random(11)

    def some() -> dict[str, Any]:
        return rng.choice(made)

    kinds = {
        "MRN": lambda: patients.find_patients(services, desk, mrn=some()["identifier"][0]["value"]),
        "full name": lambda: patients.find_patients(services, desk, name=" ".join(
            [some()["name"][0]["given"][0], some()["name"][0]["family"]])),
        "family name (many)": lambda: patients.find_patients(services, desk, name=rng.choice(FAMILIES)),
        "birth date": lambda: patients.find_patients(services, desk, birth_date=date.fromisoformat(
            some()["birthDate"])),
        "family + birth date": lambda: patients.find_patients(
            services, desk, name=(p := some())["name"][0]["family"], birth_date=date.fromisoformat(p["birthDate"])),
        "patient page": lambda: patients.patient_file(services, desk, rng.choice(
            ("maria-garcia", "sofia-garcia", "robert-chen", "linda-chen")), None),
    }
    print(f"{'kind':<22}{'p50 ms':>9}{'p95 ms':>9}  (over {args.rounds} calls, {args.patients} patients)")
    for name, call in kinds.items():
        call()  # warm
        times = []
        for _ in range(args.rounds):
            started = time.perf_counter()
            call()
            times.append((time.perf_counter() - started) * 1000)
        print(f"{name:<22}{percentile(times, 50):>9.1f}{percentile(times, 95):>9.1f}", flush=True)
    services.audit.close()
    services.engine.dispose()


if __name__ == "__main__":
    main()
