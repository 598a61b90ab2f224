"""The device's real Transport with the counters the fleet report needs.

Wrapping (instead of reading the fetcher's fields) sees every exchange of the agent:
the manifest, every image block and every report, including those of a second
attempt, without touching the agent.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Any

from otacoap.core import protocol
from otacoap.core.errors import OtaError
from otacoap.core.report import State, decode_report

from ..transport import Response, TransportError

REPORT_PATH = "/" + "/".join(protocol.PATH_REPORT)


class Tally:
    """Counters one worker shares between its devices and its progress sampler."""

    def __init__(self) -> None:
        self.blocks = 0
        self.updated = 0
        self.failed = 0
        self.in_flight = 0

    def snapshot(self) -> tuple[int, int, int, int]:
        return (self.updated, self.failed, self.in_flight, self.blocks)


class CountingTransport:
    """The device's real Transport, with counters the fleet report needs.

    Wrapping (instead of reading the fetcher's fields) sees every exchange of the
    agent: the manifest, every image block and every report, including those of a
    second attempt, without touching the agent.
    """

    def __init__(self, inner: Any, tally: Tally, fw_prefix: str = "/fw/") -> None:
        self._inner = inner
        self._tally = tally
        self._fw = fw_prefix
        self._last: tuple[Any, ...] | None = None
        self.requests = 0
        self.retransmissions = 0
        self.timeouts = 0
        self.resets = 0
        self.blocks = 0
        self.bytes = 0
        self.fw_bytes: dict[str, int] = {}  # payload bytes by /fw/ path (patch or image)
        # The detail of the device's last DOWNLOADED report: which payload it used
        # ("delta from ...", "full image (...)", "" for a plain envelope's image).
        self.downloaded_detail: str | None = None

    @property
    def base_uri(self) -> str:
        return str(self._inner.base_uri)

    def _sent(self, key: tuple[Any, ...]) -> None:
        self.requests += 1
        if key == self._last:
            self.retransmissions += 1
        self._last = key

    async def get(
        self, path: str, *, block2: tuple[int, int, int] | None, timeout: float
    ) -> Response:
        self._sent(("GET", path, block2[0] if block2 else None))
        try:
            resp: Response = await self._inner.get(path, block2=block2, timeout=timeout)
        except TransportError:
            self.timeouts += 1
            raise
        if resp.successful and path.startswith(self._fw):
            self.blocks += 1
            self.bytes += len(resp.payload)
            self.fw_bytes[path] = self.fw_bytes.get(path, 0) + len(resp.payload)
            self._tally.blocks += 1
        return resp

    async def post(
        self, path: str, payload: bytes, *, content_format: int, timeout: float
    ) -> Response:
        self._sent(("POST", path, hashlib.sha256(payload).digest()))
        if path == REPORT_PATH:
            try:
                report = decode_report(payload)
            except OtaError:
                pass
            else:
                if report.state == State.DOWNLOADED:
                    self.downloaded_detail = report.detail
        try:
            resp: Response = await self._inner.post(
                path, payload, content_format=content_format, timeout=timeout
            )
        except TransportError:
            self.timeouts += 1
            raise
        return resp

    async def observe(self, path: str) -> AsyncIterator[Response]:
        async for note in self._inner.observe(path):
            yield note

    async def reset(self) -> None:
        self.resets += 1
        await self._inner.reset()

    async def close(self) -> None:
        await self._inner.close()
