"""The `gateway` command."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click

from gateway.config import Settings

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def _settings(**overrides: Any) -> Settings:
    return Settings.from_env(**overrides)


@click.group()
def main() -> None:
    """FHIR gateway: HL7v2 in, FHIR R4 and SMART on FHIR out."""


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Bring the schema to the latest migration."""
    from gateway import db as database

    settings = _settings()
    engine = database.make_engine(settings.database_url)
    database.upgrade(engine, revision)
    click.echo(f"schema at {revision} on {engine.url.render_as_string(hide_password=True)}")


def _processor(settings: Settings) -> Any:
    from gateway import db as database
    from gateway.fhir.bundles import BundleProcessor
    from gateway.fhir.store import FhirStore

    engine = database.make_engine(settings.database_url, settings.sqlite_synchronous)
    return BundleProcessor(FhirStore(engine, settings.fhir_base))


def import_files(settings: Settings, files: list[str], echo: Any = click.echo) -> dict[str, int]:
    from gateway.fhir.bundles import import_file
    from gateway.fhir.outcome import FhirError

    processor = _processor(settings)
    totals = {"files": 0, "entries": 0, "created": 0, "updated": 0, "failed": 0}
    started = time.monotonic()
    for path in files:
        begun = time.monotonic()

        def progress(done: int, path: str = path) -> None:
            echo(f"  {path}: {done} entries", err=True)

        try:
            counts = import_file(processor, path, progress=progress)
        except FhirError as exc:
            stored = getattr(exc, "stored", 0)
            what = f"{stored} entries of it were stored before the failure" if stored else \
                "nothing from this file was stored"
            echo(f"{path}: FAILED, {what}: {exc.diagnostics}", err=True)
            totals["failed"] += 1
            continue
        totals["files"] += 1
        for key in ("entries", "created", "updated", "failed"):
            totals[key] += counts[key]
        rate = counts["entries"] / max(time.monotonic() - begun, 1e-6)
        echo(f"{path}: {counts['entries']} entries ({counts['created']} created, {counts['updated']} "
             f"updated or unchanged, {counts['failed']} failed) at {rate:.0f}/s")
    from gateway import db as database

    database.analyze(processor.store.engine)
    elapsed = time.monotonic() - started
    echo(f"imported {totals['entries']} entries from {totals['files']} of {len(files)} files in "
         f"{elapsed:.1f}s: {totals['created']} created, {totals['updated']} updated or unchanged, "
         f"{totals['failed']} failed")
    return totals


@main.command("import")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
def import_command(files: tuple[str, ...]) -> None:
    """Load FHIR Bundles (transaction, batch, collection) or NDJSON files."""
    totals = import_files(_settings(), list(files))
    if totals["failed"]:
        sys.exit(1)


def load_demo(settings: Settings) -> None:
    from gateway import db as database

    engine = database.make_engine(settings.database_url)
    database.upgrade(engine)
    files = sorted(str(p) for p in (FIXTURES / "fhir").glob("*.json"))
    if files:
        import_files(settings, files)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int)
@click.option("--workers", default=2, show_default=True, type=int, help="gunicorn worker processes")
@click.option("--threads", default=8, show_default=True, type=int, help="threads per worker")
@click.option("--demo", is_flag=True, help="create the schema, load fixtures/ and allow unauthenticated access")
def serve(host: str, port: int, workers: int, threads: int, demo: bool) -> None:
    """Run the gateway (gunicorn)."""
    import os

    if demo:
        os.environ["GATEWAY_OPEN_ACCESS"] = "1"
        os.environ.setdefault("GATEWAY_BASE_URL", f"http://{host}:{port}")
    settings = _settings()
    if demo:
        load_demo(settings)
    from gateway.serving import run_gunicorn

    click.echo(f"FHIR API:  {settings.fhir_base}  (CapabilityStatement at {settings.fhir_base}/metadata)")
    click.echo(f"Health:    {settings.base_url}/healthz  {settings.base_url}/readyz")
    if settings.open_access:
        click.echo("WARNING: open access is on: anyone who reaches this port can read and write every "
                   "record. For demos only.")
    run_gunicorn(host, port, workers, threads)


if __name__ == "__main__":
    main()
