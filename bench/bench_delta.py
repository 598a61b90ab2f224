"""Delta against full image on the real firmware pairs of ../shared/delta (issue 13 §2).

    .venv/bin/python bench/bench_delta.py              # sizes, memory, esp8266 over the link
    .venv/bin/python bench/bench_delta.py --no-link    # sizes and memory only (seconds)

Three measurements, all in the same run:

1. Sizes: for each pair, otacoap's patch (detools sequential, LZMA with an 8 KiB
   dictionary and lc=lp=pb=0, `otacoap.patching`) plus its signed delta envelope,
   against detools' own patches with its default options in every compression it has
   (the "detools' best" of the goal is the smallest of them, measured here, not quoted).
2. Device peak memory of one whole update (`DeviceAgent.run_once`, in process), full and
   delta, with tests/memory_probe.py's hygiene (tracemalloc above what was allocated
   before; free lists filled first). The device's LZMA decoder is otacoap's own
   (`core/lzma_decoder.py`, LzmaDec-sized: the dictionary plus (1846 + 768) * 2 bytes of
   probabilities for lc = lp = 0), so tracemalloc sees all of it.
3. Air time: the esp8266 pair over real DTLS (`otacoap serve` in a subprocess) behind
   a UdpImpairmentProxy with 50 ms each way (100 ms RTT), lock-step Block2 as a device
   does by default: time of `run_once` and UDP bytes both ways through the proxy, for a
   device served the full image and one served the delta (it reported v1.9.4 running).

Goals: delta payload + envelope <= detools' best on the same pair; device peak memory
during a delta install <= 64 KiB; esp8266 by delta in <= 1/5 of the full image's time.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from delta_rig import DELTA_DIR, PAIRS, delta_release, make_delta_rig, pair  # noqa: E402
from memory_probe import _measure  # noqa: E402
from server_helpers import CLASS_A, VENDOR, DeviceSpec, make_setup, running_server  # noqa: E402

from device_sim.agent import AgentConfig, DeviceAgent, Outcome  # noqa: E402
from device_sim.coap import CoapTransport  # noqa: E402
from device_sim.fetcher import FetchConfig  # noqa: E402
from device_sim.inprocess import InProcessServer, InProcessTransport  # noqa: E402
from device_sim.netem import Direction, LinkProfile, UdpImpairmentProxy  # noqa: E402
from device_sim.provision import provision  # noqa: E402
from otacoap import patching  # noqa: E402
from otacoap.core import cose, delta, suit  # noqa: E402
from otacoap.core.build import Release, build_envelope  # noqa: E402
from otacoap.core.lzma_decoder import probability_bytes  # noqa: E402

DETOOLS_COMPRESSIONS = ("lzma", "bz2", "zstd", "lz4", "heatshrink", "crle", "none")
LZMA_DICT = patching.DICT_SIZE
LZMA_STATE = LZMA_DICT + probability_bytes(0, 0)


def sizes() -> None:
    key = cose.generate_key("es256")
    print("1. sizes (bytes)")
    head = f"{'pair':<11} {'image':>8} {'ours':>8} {'+envelope':>10}"
    head += "".join(f" {c:>10}" for c in DETOOLS_COMPRESSIONS) + "  best detools   goal"
    print(head)
    for name in PAIRS:
        old, new = pair(name)
        t0 = time.monotonic()
        ours = patching.create_patch(old, new)
        made = time.monotonic() - t0
        env = delta_release(key, old, new, 2, patch=ours).envelope
        theirs = {}
        for c in DETOOLS_COMPRESSIONS:
            theirs[c] = len(patching.detools_patch(old, new, c))
        best = min(theirs, key=lambda c: theirs[c])
        total = len(ours) + len(env)
        row = f"{name:<11} {len(new):>8} {len(ours):>8} {total:>10}"
        row += "".join(f" {theirs[c]:>10}" for c in DETOOLS_COMPRESSIONS)
        ok = "met" if total <= theirs[best] else "NOT met"
        row += f"  {best} {theirs[best]}  {ok} ({total / theirs[best]:.3f}); made in {made:.1f} s"
        print(row, flush=True)


async def _update_peak(tmp: Path, name: str, by_delta: bool) -> tuple[int, Outcome, int]:
    old, new = pair(name)
    slot = -(-max(len(old), len(new)) // 4096) * 4096 + 4096
    rig = make_delta_rig(tmp, old, slot_size=slot)
    rel = delta_release(rig.key, old, new, 6)
    server = InProcessServer(envelope=rel.envelope if by_delta else rel.full)
    rel.serve(server)
    device = DeviceAgent(rig.path, "coaps://in-process", transport=InProcessTransport(server))

    async def warm_up() -> None:
        return None

    try:
        peak, result, _ = await _measure(device, warm_up)
    finally:
        await device.close()
    fetched = server.block_requests
    return peak, result.outcome, fetched


def memory(tmp: Path) -> None:
    print("\n2. device peak memory of one whole update, in process (tracemalloc, bytes)")
    print(
        f"{'pair':<11} {'full':>8} {'delta':>8} {'blocks full/delta':>18}   "
        f"goal: delta install <= 65536 (of which LZMA state {LZMA_STATE})"
    )
    for name in PAIRS:
        cells = []
        for by_delta in (False, True):
            where = tmp / f"mem-{name}-{by_delta}"
            where.mkdir()
            cells.append(asyncio.run(_update_peak(where, name, by_delta)))
        (full, fo, fb), (dp, do, db) = cells
        assert fo == Outcome.UPDATED and do == Outcome.UPDATED, (fo, do)
        ok = "met" if dp <= 65536 else "NOT met"
        print(f"{name:<11} {full:>8} {dp:>8} {fb:>8}/{db:<8}   {ok}", flush=True)


async def _link_run(flash: Path, device_id: str, psk: bytes, port: int) -> tuple[float, int, str]:
    profile = LinkProfile(delay_ms=50.0)
    proxy = await UdpImpairmentProxy.start(("127.0.0.1", port), profile=profile, seed=1)
    uri = f"coaps://127.0.0.1:{proxy.address[1]}"
    transport = CoapTransport(uri, device_id, psk)
    fetch = FetchConfig(deadline=3600.0, min_throughput=0.0)
    device = DeviceAgent(flash, uri, config=AgentConfig(fetch=fetch), transport=transport)
    t0 = time.monotonic()
    try:
        result = await device.run_once()
    finally:
        await device.close()
        await transport.close()
        stats = dict(proxy.stats)
        await proxy.aclose()
    spent = time.monotonic() - t0
    air = sum(stats[d].forwarded_bytes for d in Direction)
    return spent, air, f"{result.outcome.value} {result.detail}".strip()


def link(base: Path) -> None:
    print("\n3. esp8266 v1.9.4 -> v1.10 over DTLS, 100 ms RTT, lock-step (run_once)")
    old, new = pair("esp8266")
    devices = {"bench-delta": bytes(range(16)), "bench-full": bytes(range(16, 32))}
    setup = make_setup(base, devices=[DeviceSpec(d, CLASS_A, psk=p) for d, p in devices.items()])
    key = setup.key
    factory = setup.release(CLASS_A, 1, b"factory image".ljust(4096, b"."))

    def env(image: bytes, seq: int, patch: delta.DeltaInfo | None = None) -> bytes:
        rel = Release(hashlib.sha256(image).digest(), len(image), VENDOR, CLASS_A, seq)
        return suit.encode_envelope(build_envelope(rel, key, patch=patch))

    files = base / "files"
    files.mkdir()
    (files / "old.bin").write_bytes(old)
    (files / "new.bin").write_bytes(new)
    (files / "v2.suit").write_bytes(env(old, 2))
    (files / "v3.suit").write_bytes(env(new, 3))
    p = patching.create_patch(old, new)
    (files / "v3.patch").write_bytes(p)
    info = delta.DeltaInfo(suit.SuitDigest.of(old), len(old), suit.SuitDigest.of(p), len(p))
    (files / "v3d.suit").write_bytes(env(new, 3, info))
    flashes = {}
    for device_id, psk in devices.items():
        flashes[device_id] = base / f"{device_id}.flash"
        provision(
            flashes[device_id],
            device_id=device_id,
            psk=psk,
            vendor_domain=VENDOR,
            class_info=CLASS_A,
            anchors_pem=(setup.key_pub.read_bytes(),),
            factory_image=factory.image,
            factory_envelope=factory.envelope,
            slot_size=640 * 1024,
        )
    with running_server(setup.data) as server:
        from server_helpers import cli_ok

        cli_ok("publish", "--data", setup.data, files / "v2.suit", files / "old.bin")
        # The delta device runs v1.9.4 and says so (its reports carry seq 2).
        d = DeviceAgent(
            flashes["bench-delta"],
            server.uri,
            transport=CoapTransport(server.uri, "bench-delta", devices["bench-delta"]),
        )

        async def first() -> Outcome:
            try:
                return (await d.run_once()).outcome
            finally:
                await d.close()

        assert asyncio.run(first()) == Outcome.UPDATED
        cli_ok("publish", "--data", setup.data, files / "v3.suit", files / "new.bin",
               "--delta", files / "v3d.suit", files / "v3.patch")  # fmt: skip
        time.sleep(1.5)  # the server's store view notices the new release
        rows = {}
        for device_id in ("bench-full", "bench-delta"):
            spent, air, outcome = asyncio.run(
                _link_run(flashes[device_id], device_id, devices[device_id], server.port)
            )
            rows[device_id] = spent
            what = "full " if device_id == "bench-full" else "delta"
            print(f"{what}: {spent:7.1f} s, {air:>9} B on the air  ({outcome})", flush=True)
        ratio = rows["bench-delta"] / rows["bench-full"]
        ok = "met" if ratio <= 0.2 else "NOT met"
        print(f"delta/full time = {ratio:.3f} (goal <= 0.2: {ok})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-link", action="store_true", help="skip the DTLS link runs")
    args = parser.parse_args(argv)
    if not DELTA_DIR.is_dir():
        print(f"{DELTA_DIR} not found (set OTACOAP_SHARED)")
        return 1
    base = Path(tempfile.mkdtemp(prefix="bench-delta-"))
    try:
        sizes()
        memory(base)
        if not args.no_link:
            link(base / "link")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
