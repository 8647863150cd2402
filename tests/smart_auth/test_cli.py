"""`gateway client add`, `user add`, `proxy grant`, `launch` through click's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from joserfc.jwk import KeySet, RSAKey

from gateway.cli import main
from tests.smart_auth.conftest import load_family


def _run(runner: CliRunner, *args: str) -> Any:
    result = runner.invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_smart_provisioning_commands(app: Any, settings: Any, tmp_path: Path) -> None:
    load_family(app.extensions["gateway"].store)
    runner = CliRunner(env={"GATEWAY_DATABASE_URL": settings.database_url, "GATEWAY_BASE_URL": settings.base_url,
                            "GATEWAY_INSTANCE_PATH": str(tmp_path)})
    public = _run(runner, "client", "add", "--client-id", "cli-app", "--redirect-uri", "http://app.example/cb",
                  "--public", "--launch-url", "http://app.example/launch")
    assert public["client_type"] == "public" and public["token_endpoint_auth_method"] == "none"
    secret = _run(runner, "client", "add", "--client-id", "cli-secret", "--redirect-uri", "http://app.example/cb",
                  "--secret", "a-long-secret", "--scope", "patient/*.rs launch/patient")
    assert secret["scope"] == "patient/*.rs launch/patient"
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(KeySet([RSAKey.generate_key(2048, {"kid": "k"})]).as_dict(private=False)))
    backend = _run(runner, "client", "add", "--client-id", "cli-backend", "--redirect-uri", "http://app.example/cb",
                   "--jwks-file", str(jwks))
    assert backend["token_endpoint_auth_method"] == "private_key_jwt" and "system/*.cruds" in backend["scope"]
    both = runner.invoke(main, ["client", "add", "--client-id", "x", "--redirect-uri", "http://a/b", "--public",
                                "--secret", "s"])
    assert both.exit_code != 0 and "exactly one" in both.output

    user = _run(runner, "user", "add", "--username", "maria", "--password", "correct horse battery",
                "--fhir-user", "Patient/maria-garcia", "--totp-secret", "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP")
    assert user == {"username": "maria", "fhir_user": "Patient/maria-garcia", "mfa": True}
    # The password is stored as an argon2 hash, never as given.
    from sqlalchemy import select

    from gateway.smart_auth.models import auth_user

    with app.extensions["gateway"].engine.connect() as conn:
        stored = conn.execute(select(auth_user.c.password_hash)).scalar_one()
    assert stored.startswith("$argon2") and "correct horse" not in stored

    proxy = _run(runner, "proxy", "grant", "--username", "maria", "--patient", "Patient/daniel-garcia",
                 "--relationship", "MTH")
    assert proxy["valid_until"] == "2029-05-09"  # the day before Daniel turns 18
    missing = runner.invoke(main, ["proxy", "grant", "--username", "maria", "--patient", "Patient/nobody",
                                   "--relationship", "MTH"])
    assert missing.exit_code != 0 and "no Patient/nobody" in missing.output

    launched = _run(runner, "launch", "--client-id", "cli-app", "--patient", "Patient/daniel-garcia",
                    "--user", "maria")
    assert launched["launch_url"].startswith("http://app.example/launch?iss=")
    assert f"launch={launched['launch']}" in launched["launch_url"]
    assert app.extensions["gateway"].smart.launch_for(launched["launch"], "cli-app").patient_id == "daniel-garcia"


def test_demo_logins_are_idempotent(app: Any) -> None:
    from gateway.smart_auth.admin import load_demo_logins
    from gateway.smart_auth.people import check_password

    services = app.extensions["gateway"]
    load_family(services.store)
    first = load_demo_logins(services.engine, services.store, "http://127.0.0.1:8080")
    second = load_demo_logins(services.engine, services.store, "http://127.0.0.1:8080")
    assert first == second and any(line.startswith("maria / demo-password") for line in first)
    assert check_password(services.engine, "linda", "demo-password").fhir_user == "Patient/linda-chen"
    assert services.smart.query_client("demo-app") is not None


def test_activation_code_command(app: Any, settings: Any, tmp_path: Path) -> None:
    from gateway.smart_auth.people import sign_up

    load_family(app.extensions["gateway"].store)
    runner = CliRunner(env={"GATEWAY_DATABASE_URL": settings.database_url, "GATEWAY_INSTANCE_PATH": str(tmp_path)})
    result = runner.invoke(main, ["activation-code", "--patient", "Patient/linda-chen"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    code = result.stdout.strip()
    assert len(code) == 19 and code.count("-") == 3
    assert sign_up(app.extensions["gateway"].engine, code, "linda", "long password").fhir_user == "Patient/linda-chen"
    missing = runner.invoke(main, ["activation-code", "--patient", "Patient/nobody"])
    assert missing.exit_code != 0
