"""The server seen from monitoring (issue 12 §1): a real `otacoap serve` with
`--metrics 127.0.0.1:0` answers Prometheus text on /metrics (parsed with
prometheus_client's own parser) and JSON on /health; the figures move with what devices
do (a download, a report) and show campaigns per wave; `--log-format json` logs JSON
lines. Off unless configured."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_helpers import (
    CLASS_A,
    DeviceSpec,
    ServerProcess,
    cli_ok,
    coaps_client,
    fetch_blocks,
    make_image,
    make_setup,
    running_server,
)

pytestmark = [pytest.mark.network, pytest.mark.timeout(120)]


def _metrics_url(server: ServerProcess) -> str:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for line in server.lines:
            m = re.match(r"metrics on (http://\S+)/metrics", line)
            if m:
                return m.group(1)
        time.sleep(0.05)
    raise AssertionError(f"no metrics line: {server.lines}")


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def _samples(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, ctype, text = _get(base + "/metrics")
    assert status == 200 and ctype.startswith("text/plain"), (status, ctype)
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_and_health_follow_what_devices_do(tmp_path: Path) -> None:
    setup = make_setup(tmp_path, devices=[DeviceSpec("t1"), DeviceSpec("t2")])
    rel = setup.release(CLASS_A, 2, make_image("fw", 5000))
    setup.publish(rel)
    with running_server(setup.data, args=["--metrics", "127.0.0.1:0"]) as server:
        base = _metrics_url(server)
        status, ctype, body = _get(base + "/health")
        assert status == 200 and ctype == "application/json" and json.loads(body)["status"] == "ok"
        assert _get(base + "/nope")[0] == 404
        before = _samples(base)
        assert before[("otacoap_fw_blocks_served_total", ())] == 0
        assert before[("otacoap_dtls_sessions", (("pool", "authenticated"),))] == 0

        async def download() -> bytes:
            async with coaps_client(server.port, "t1", setup.devices["t1"].psk) as ctx:
                return await fetch_blocks(ctx, server.uri + rel.image_uri)

        assert asyncio.run(download()) == rel.image
        after = _samples(base)
        assert after[("otacoap_fw_blocks_served_total", ())] == 5  # 5000 B in 1 KiB blocks
        assert after[("otacoap_fw_bytes_served_total", ())] == 5000
        assert after[("otacoap_dtls_handshakes_total", (("outcome", "ok"),))] >= 1

        # A staged release rolled out by a campaign shows per wave.
        rel3 = setup.release(CLASS_A, 3, make_image("fw3", 3000))
        cli_ok("publish", "--data", setup.data, "--rollout", "none", rel3.envelope_path,
               rel3.image_path)  # fmt: skip
        cli_ok("campaign", "create", "--data", setup.data, f"{CLASS_A}:3", "--waves", "1,100%")
        samples = _samples(base)
        waves = {
            (dict(labels)["wave"], dict(labels)["state"]): v
            for (name, labels), v in samples.items()
            if name == "otacoap_campaign_members"
        }
        assert sum(waves.values()) == 2 and {w for w, _ in waves} == {"1", "2"}
        assert samples[("otacoap_campaign_state", (("campaign", "1"), ("state", "running")))] == 1


def test_json_logs_and_metrics_off_by_default(tmp_path: Path) -> None:
    setup = make_setup(tmp_path, devices=[DeviceSpec("t1")])
    with running_server(setup.data, args=["--log-format", "json"]) as server:
        assert not any("metrics on" in line for line in server.lines)
    lines = [line for line in server.log().splitlines() if line.strip()]
    assert lines, "the server logged nothing"
    for line in lines:
        doc = json.loads(line)
        assert {"ts", "level", "logger", "message"} <= doc.keys()
    assert any("serving coaps://" in json.loads(line)["message"] for line in lines)
