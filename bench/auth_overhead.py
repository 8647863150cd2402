"""The price of authorization: FHIR reads with a SMART bearer token against the same reads unchecked.

In one process, on one SQLite file with the demo family: `GET /fhir/Observation/{id}` through the
Flask test client, alternating rounds with a patient/*.rs token (token lookup, scope check and the
compartment restriction query) and rounds under open access without a token (the benchmark-only
bypass: no token, no restriction). Same ids, same order. Prints reads/s of both and the overhead.

    python bench/auth_overhead.py [--reads 4000] [--rounds 6]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway import create_app, db  # noqa: E402
from gateway.config import Settings  # noqa: E402
from gateway.fhir.bundles import BundleProcessor, import_file  # noqa: E402
from gateway.smart_auth import admin, people  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reads", type=int, default=4000, help="reads per round")
    parser.add_argument("--rounds", type=int, default=6, help="rounds of each kind, alternating")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/bench.sqlite"
        db.upgrade(db.make_engine(url))
        settings = Settings.from_env(environ={}, database_url=url, open_access=True, base_url="http://localhost",
                                     instance_path=tmp, audit_enabled=True)
        app = create_app(settings)
        services = app.extensions["gateway"]
        processor = BundleProcessor(services.store)
        for name in ("00-organization.json", "10-garcia-family.json"):
            import_file(processor, str(ROOT / "fixtures" / "fhir" / name))
        token = _mint_token(services)
        with services.store.reading() as repo:
            ids = [row.id for row in repo.conn.execute(
                db.resource.select().where(db.resource.c.resource_type == "Observation",
                                           db.resource.c.id.like("maria-garcia-%")))]
        rng = random.Random(7)
        order = [rng.choice(ids) for _ in range(args.reads)]
        client = app.test_client()
        bearer = {"Authorization": f"Bearer {token}"}
        assert client.get(f"/fhir/Observation/{order[0]}", headers=bearer).status_code == 200
        timings: dict[str, list[float]] = {"token": [], "bypass": []}
        # CPU time of this process (request thread and audit writer) per read: other processes on a
        # shared machine disturb it far less than wall time, though it leaves out time spent waiting.
        cpu: dict[str, list[float]] = {"token": [], "bypass": []}
        for _ in range(args.rounds):
            for kind, headers in (("bypass", {}), ("token", bearer)):
                started, cpu_started = time.perf_counter(), time.process_time()
                for rid in order:
                    response = client.get(f"/fhir/Observation/{rid}", headers=headers)
                    if response.status_code != 200:
                        raise SystemExit(f"{kind} read of {rid}: {response.status_code}")
                timings[kind].append(args.reads / (time.perf_counter() - started))
                cpu[kind].append((time.process_time() - cpu_started) / args.reads * 1e6)
        services.audit.flush()
    best = {k: max(v) for k, v in timings.items()}
    median = {k: sorted(v)[len(v) // 2] for k, v in timings.items()}
    print(f"reads/s without a token (bypass): best {best['bypass']:.0f}, median {median['bypass']:.0f}")
    print(f"reads/s with a bearer token:      best {best['token']:.0f}, median {median['token']:.0f}")
    overhead = (median["bypass"] / median["token"] - 1) * 100
    print(f"authorization overhead (median): {overhead:.1f}% (target: at most 10%)")
    cpu_median = {k: sorted(v)[len(v) // 2] for k, v in cpu.items()}
    cpu_overhead = (cpu_median["token"] / cpu_median["bypass"] - 1) * 100
    print(f"CPU time per read (median): bypass {cpu_median['bypass']:.0f} us, token {cpu_median['token']:.0f} us, "
          f"overhead {cpu_overhead:.1f}%")


def _mint_token(services: SimpleNamespace) -> str:
    """A patient/*.rs token for Maria, issued through the same generator and store the token endpoint uses."""
    smart = services.smart
    admin.register_client(smart.engine, "bench-app", ["http://localhost/cb"], public=True)
    user = people.add_user(smart.engine, "bench", "benchmark password", "Patient/maria-garcia")
    owner = smart.start_grant("bench-app", user, "maria-garcia", None, "launch/patient patient/*.rs")
    client = smart.query_client("bench-app")
    token = smart.generate_token("authorization_code", client, owner, "launch/patient patient/*.rs",
                                 include_refresh_token=False)
    smart.save_token(token, SimpleNamespace(user=owner, client=client))
    return token["access_token"]


if __name__ == "__main__":
    main()
