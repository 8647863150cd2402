"""Bad input to a real `gateway mllp` process: what the sender gets back, and what is stored."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select

from gateway import db
from gateway.hl7.mllp import Deframer, frame
from tests.conftest import free_port
from tests.processes import ROOT, gateway_env, gateway_process

pytestmark = pytest.mark.slow

MiB = 1024 * 1024
HEADER = "MSH|^~\\&|LAB|RIVERSIDE|GATEWAY|RIVERSIDE|20261202083000||ORU^R01^ORU_R01|{control}|P|2.5.1\r"
REPORT = (HEADER + "PID|1||MRN50^^^RIVERSIDE^MR||Large^Lena||19700101|F\r"
          "OBR|1|PL50|FL50|PDF^Scanned report|||20261202080000\r"
          "OBX|1|ED|PDF^Scanned report||^application^pdf^Base64^{document}||||||F\r")


def _acks(sock: socket.socket, deframer: Deframer, count: int) -> list[str]:
    frames: list[bytes] = []
    while len(frames) < count:
        data = sock.recv(MiB)
        assert data, "the listener closed the connection"
        frames += deframer.feed(data)
    return [f.decode() for f in frames]


def _msa(ack: str) -> list[str]:
    return next(s for s in ack.split("\r") if s.startswith("MSA")).split("|")


def test_a_50_mb_message_is_stored_by_its_start_and_answered_ae_104_on_a_connection_that_goes_on(
        tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'big.sqlite'}"
    port = free_port()
    env = gateway_env(GATEWAY_DATABASE_URL=url, GATEWAY_MLLP_PORT=str(port), GATEWAY_MLLP_PROCESSES="1",
                      GATEWAY_INSTANCE_PATH=str(tmp_path))  # the default maximum: 16 MiB
    subprocess.run([sys.executable, "-m", "gateway.cli", "db", "upgrade"], env=env, cwd=ROOT, check=True,
                   capture_output=True)
    big = REPORT.format(control="BIG50", document="QUJD" * (50 * MiB // 4)).encode()
    small = REPORT.format(control="SMALL1", document="QUJD").encode()
    log = tmp_path / "mllp.log"
    with gateway_process(["mllp"], env, log, ports=(port,)), \
            socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        deframer = Deframer(MiB)
        sock.sendall(frame(big) + frame(small))
        nak, ack = _acks(sock, deframer, 2)
    assert _msa(nak)[1:3] == ["AE", "BIG50"] and "|104" in nak
    assert f"message of {len(big):,} bytes exceeds the maximum of {16 * MiB:,} bytes" in nak
    assert _msa(ack)[1:3] == ["AA", "SMALL1"]
    assert f"a message of {len(big)} bytes" in log.read_text()
    engine = create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(select(db.hl7_message).order_by(db.hl7_message.c.id)).all()
    engine.dispose()
    stored, processed = rows
    assert (stored.control_id, stored.status, stored.error_code) == ("BIG50", "failed", "104")
    assert stored.truncated_from_bytes == len(big)
    assert stored.raw.startswith(HEADER.format(control="BIG50")) and "OBX" not in stored.raw
    assert (processed.control_id, processed.status) == ("SMALL1", "processed")
