"""Where the /fw fast path takes a block's bytes from (otacoap/server/fastpath.py).

An image within the fast path's memory budget is read once and served from memory; a
larger one is read per block from its file. Both must answer the same bytes, and both
must decline a blob shorter than its recorded size, so that FirmwareResource reports
it as before the in-memory copy existed.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import aiocoap
import pytest
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import CON
from server_helpers import DeviceSpec, SessionRemote, Setup, make_image, make_setup

from otacoap.server import fastpath
from otacoap.server.fastpath import FirmwareFastPath
from otacoap.server.store_view import StoreView
from otacoap.store import DataDir

IMAGE_SIZE = 5000  # 5 blocks of 1024, the last one short


def _get(image_id: str, num: int) -> bytes:
    msg = aiocoap.Message(code=Code.GET)
    msg.mtype, msg.mid, msg.token = CON, 0x1000 + num, b"\x07"
    msg.opt.uri_path = ("fw", image_id)
    msg.opt.block2 = (num, 0, 6)
    return bytes(msg.encode())


def _answers(setup: Setup, image_id: str) -> tuple[list[bytes | None], FirmwareFastPath]:
    datadir = DataDir(setup.data)
    view = StoreView(datadir, datadir.config())
    fast = FirmwareFastPath(view)
    try:
        _, principal = view.psks.find_dtls_psk(b"t1")
        remote = SessionRemote([principal])
        return [fast.handle(remote, _get(image_id, n)) for n in range(5)], fast
    finally:
        fast.close()
        asyncio.run(view.close())


@pytest.fixture()
def published(tmp_path: Path) -> Iterator[tuple[Setup, bytes, str, Path]]:
    setup = make_setup(tmp_path, devices=[DeviceSpec("t1")])
    image = make_image("bytes", IMAGE_SIZE)
    release = setup.release("thermostat-t1", 1, image)
    setup.publish(release)
    blob = DataDir(setup.data).blobs.path_of(release.digest)
    yield setup, image, release.image_id, blob


def _payload(answer: bytes | None) -> bytes:
    assert answer is not None
    return answer[answer.index(b"\xff") + 1 :]


def test_an_image_within_the_budget_is_served_from_memory(
    published: tuple[Setup, bytes, str, Path],
) -> None:
    setup, image, image_id, _ = published
    answers, fast = _answers(setup, image_id)
    assert b"".join(_payload(a) for a in answers) == image
    assert fast.served == 5


def test_an_image_beyond_the_budget_is_read_per_block_with_the_same_bytes(
    published: tuple[Setup, bytes, str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    setup, image, image_id, _ = published
    in_memory, _ = _answers(setup, image_id)
    monkeypatch.setattr(fastpath, "_MAX_CACHED", IMAGE_SIZE - 1)
    from_file, _ = _answers(setup, image_id)
    assert from_file == in_memory
    assert b"".join(_payload(a) for a in from_file) == image


@pytest.mark.parametrize("budget", [fastpath._MAX_CACHED, 0])
def test_a_blob_shorter_than_recorded_is_declined_for_the_missing_blocks(
    published: tuple[Setup, bytes, str, Path], monkeypatch: pytest.MonkeyPatch, budget: int
) -> None:
    setup, image, image_id, blob = published
    monkeypatch.setattr(fastpath, "_MAX_CACHED", budget)
    os.chmod(blob, 0o600)
    blob.write_bytes(image[:2500])  # blocks 0 and 1 whole, block 2 cut, 3 and 4 gone
    answers, fast = _answers(setup, image_id)
    assert [a is not None for a in answers] == [True, True, False, False, False]
    assert _payload(answers[1]) == image[1024:2048]
    assert fast.served == 2
