"""The server seen from the operator's monitoring: Prometheus metrics and a health check
over HTTP (issue 12 §1), off unless `[monitoring] metrics_bind` or `serve --metrics` names
an address (loopback is what the README suggests).

One small asyncio HTTP/1.1 listener on the server's own loop, no thread: `GET /metrics`
answers the Prometheus text format (`prometheus_client`'s exposition of a registry built
per scrape from one snapshot, so a scrape is consistent), `GET /health` answers 200 while
the store answers and 503 when it does not. Every request is bounded: the request head
must arrive within `REQUEST_TIMEOUT` seconds and `MAX_HEAD` bytes, one request per
connection.

What is exported: DTLS sessions and handshakes (completed, failed by reason), firmware
blocks and bytes served, uploads in progress, reports stored by state, and each active or
recent campaign's members per wave and state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..store import Store
from ..store.errors import StoreUnavailable
from .store_view import StoreView

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 5.0
MAX_HEAD = 8192
MAX_CAMPAIGNS = 50  # the most recent campaigns exported (labels stay bounded)


@dataclass(frozen=True)
class StoreFacts:
    reports_by_state: dict[str, int]
    campaigns: list[dict[str, Any]]


def _store_facts(store: Store) -> StoreFacts:
    campaigns = []
    for c in store.list_campaigns()[-MAX_CAMPAIGNS:]:
        status = store.campaign_status(c.id)
        campaigns.append(
            {
                "id": c.id,
                "release": f"{c.class_label}:{c.sequence_number}",
                "state": c.state,
                "opened": c.progress.opened,
                "waves": [
                    {
                        "pending": w.pending,
                        "admitted": w.admitted,
                        "succeeded": w.succeeded,
                        "failed": w.failed,
                    }
                    for w in status.waves
                ],
            }
        )
    return StoreFacts(store.report_counts(), campaigns)


class _Snapshot:
    """A prometheus_client collector over one snapshot of the server and its store."""

    def __init__(self, stats: dict[str, Any], view: StoreView, facts: StoreFacts) -> None:
        self._stats = stats
        self._view = view
        self._facts = facts

    def collect(self) -> Iterator[Metric]:
        dtls = self._stats.get("dtls", {})
        g = GaugeMetricFamily("otacoap_dtls_sessions", "DTLS sessions by pool", labels=["pool"])
        for pool in ("sessions", "handshaking", "unverified"):
            g.add_metric([pool if pool != "sessions" else "authenticated"], dtls.get(pool, 0))
        yield g
        c = CounterMetricFamily(
            "otacoap_dtls_sessions_dropped", "DTLS sessions dropped, by why", labels=["reason"]
        )
        for why, n in sorted(dtls.get("dropped", {}).items()):
            c.add_metric([why], n)
        yield c
        hs = self._stats.get("handshakes", {})
        c = CounterMetricFamily(
            "otacoap_dtls_handshakes", "DTLS handshakes, by outcome", labels=["outcome"]
        )
        c.add_metric(["ok"], hs.get("completed", 0))
        for why, n in sorted(hs.get("by_reason", {}).items()):
            c.add_metric([f"failed_{why}"], n)
        yield c
        blocks = sum(self._view.blocks_served.values())
        yield CounterMetricFamily(
            "otacoap_fw_blocks_served", "firmware Block2 responses sent", value=blocks
        )
        yield CounterMetricFamily(
            "otacoap_fw_bytes_served",
            "firmware payload bytes sent",
            value=self._view.fw_bytes_served,
        )
        yield GaugeMetricFamily(
            "otacoap_uploads_in_progress",
            "operator Block1 uploads",
            value=self._stats.get("uploads", 0),
        )
        r = GaugeMetricFamily(
            "otacoap_reports", "device reports stored, by state", labels=["state"]
        )
        for state, n in sorted(self._facts.reports_by_state.items()):
            r.add_metric([state], n)
        yield r
        m = GaugeMetricFamily(
            "otacoap_campaign_members",
            "campaign members per wave and state",
            labels=["campaign", "release", "wave", "state"],
        )
        s = GaugeMetricFamily(
            "otacoap_campaign_state", "1 for the campaign's state", labels=["campaign", "state"]
        )
        o = GaugeMetricFamily(
            "otacoap_campaign_waves_opened", "waves opened so far", labels=["campaign"]
        )
        for camp in self._facts.campaigns:
            cid = str(camp["id"])
            s.add_metric([cid, camp["state"]], 1)
            o.add_metric([cid], camp["opened"])
            for i, wave in enumerate(camp["waves"], 1):
                for state, n in wave.items():
                    m.add_metric([cid, camp["release"], str(i), state], n)
        yield from (m, s, o)


class MetricsEndpoint:
    """`/metrics` and `/health` over HTTP for one running server."""

    def __init__(self, view: StoreView, stats: Callable[[], dict[str, Any]]) -> None:
        self._view = view
        self._stats = stats
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._handle, host, port)
        sockname = self._server.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def render(self) -> bytes:
        facts = await self._view.db(_store_facts)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Snapshot(self._stats(), self._view, facts))
        return generate_latest(registry)

    async def health(self) -> tuple[int, dict[str, Any]]:
        try:
            await asyncio.wait_for(self._view.db(lambda s: s.generations()), REQUEST_TIMEOUT)
        except Exception as exc:  # the store is what health is about: any failure is 503
            return 503, {"status": "unavailable", "store": f"{type(exc).__name__}: {exc}"[:200]}
        return 200, {"status": "ok", "store": "ok"}

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        method = "GET"
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            if len(head) > MAX_HEAD:
                raise ValueError("request head too large")
            method, target, *_ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            status, ctype, body = await self._route(method, target.split("?", 1)[0])
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                ValueError, ConnectionError):  # fmt: skip
            status, ctype, body = 400, "text/plain", b"bad request\n"
        except StoreUnavailable:  # /metrics reads the store: down means 503, not 500
            status, ctype, body = 503, "text/plain", b"store unavailable\n"
        except Exception:
            log.exception("metrics request failed")
            status, ctype, body = 500, "text/plain", b"internal error\n"
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  500: "Internal Server Error", 503: "Service Unavailable"}[status]  # fmt: skip
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + (body if method != "HEAD" else b"")
        )
        with contextlib.suppress(ConnectionError, TimeoutError):
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        writer.close()

    async def _route(self, method: str, path: str) -> tuple[int, str, bytes]:
        if path not in ("/metrics", "/health"):
            return 404, "text/plain", b"not found: try /metrics or /health\n"
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"GET only\n"
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, await self.render()
        status, doc = await self.health()
        return status, "application/json", json.dumps(doc).encode() + b"\n"
