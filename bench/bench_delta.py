"""Delta against full image on the real firmware pairs of ../shared/delta (issue 13 §2).

    .venv/bin/python bench/bench_delta.py              # sizes, memory, esp8266 over the link
    .venv/bin/python bench/bench_delta.py --no-link    # sizes and memory only (seconds)
    .venv/bin/python bench/bench_delta.py --link-pair pybv11 --skip-full   # shorter link part

Three measurements, all in the same run:

1. Sizes: for each pair, otacoap's patch (detools sequential, LZMA with an 8 KiB
   dictionary and lc=lp=pb=0, `otacoap.patching`) plus its signed delta envelope (and
   the encrypted delta's: patch ciphertext plus its envelope, "enc+env"),
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

Each part has an "encrypted delta" row (issue 13 §3b): the release and its patch
encrypted (A128CTR under a class KEK, `core.encryption`), the device sealed (slots
encrypted at rest) and decrypting the patch while it streams into the patch decoder;
and, over the link, an "encrypted full" row (the same release's ciphertext).

Goals: delta payload + envelope <= detools' best on the same pair; device peak memory
during a delta install <= 64 KiB; esp8266 by delta in <= 1/5 of the full image's time.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from delta_rig import DELTA_DIR, PAIRS, delta_release, make_delta_rig, pair  # noqa: E402
from encdelta_rig import KEK, encrypted_delta_release, make_encdelta_rig  # noqa: E402
from memory_probe import _measure  # noqa: E402
from server_helpers import (  # noqa: E402
    CLASS_A,
    CLASS_B,
    VENDOR,
    DeviceSpec,
    make_setup,
    running_server,
)

from device_sim.agent import AgentConfig, DeviceAgent, Outcome  # noqa: E402
from device_sim.coap import CoapTransport  # noqa: E402
from device_sim.fetcher import FetchConfig  # noqa: E402
from device_sim.inprocess import InProcessServer, InProcessTransport  # noqa: E402
from device_sim.netem import Direction, LinkProfile, UdpImpairmentProxy  # noqa: E402
from device_sim.provision import provision  # noqa: E402
from otacoap import patching  # noqa: E402
from otacoap.core import cose, delta, encryption, ids, suit  # noqa: E402
from otacoap.core.build import EncryptedPatch, Release, build_envelope  # noqa: E402
from otacoap.core.lzma_decoder import probability_bytes  # noqa: E402

DETOOLS_COMPRESSIONS = ("lzma", "bz2", "zstd", "lz4", "heatshrink", "crle", "none")
LZMA_DICT = patching.DICT_SIZE
LZMA_STATE = LZMA_DICT + probability_bytes(0, 0)


def sizes() -> None:
    key = cose.generate_key("es256")
    print("1. sizes (bytes)")
    head = f"{'pair':<11} {'image':>8} {'ours':>8} {'+envelope':>10} {'enc+env':>8}"
    head += "".join(f" {c:>10}" for c in DETOOLS_COMPRESSIONS) + "  best detools   goal"
    print(head)
    for name in PAIRS:
        old, new = pair(name)
        t0 = time.monotonic()
        ours = patching.create_patch(old, new)
        made = time.monotonic() - t0
        env = delta_release(key, old, new, 2, patch=ours).envelope
        erel = encrypted_delta_release(key, old, new, 2)  # A128CTR: same patch size
        enc_total = len(erel.patch_ct) + len(erel.envelope)
        theirs = {}
        for c in DETOOLS_COMPRESSIONS:
            theirs[c] = len(patching.detools_patch(old, new, c))
        best = min(theirs, key=lambda c: theirs[c])
        total = len(ours) + len(env)
        row = f"{name:<11} {len(new):>8} {len(ours):>8} {total:>10} {enc_total:>8}"
        row += "".join(f" {theirs[c]:>10}" for c in DETOOLS_COMPRESSIONS)
        ok = "met" if total <= theirs[best] else "NOT met"
        row += f"  {best} {theirs[best]}  {ok} ({total / theirs[best]:.3f}); made in {made:.1f} s"
        print(row, flush=True)


async def _update_peak(
    tmp: Path, name: str, by_delta: bool, encrypted: bool = False, seal: bool = False
) -> tuple[int, Outcome, int]:
    old, new = pair(name)
    slot = -(-max(len(old), len(new)) // 4096) * 4096 + 4096
    if encrypted:  # an encrypted delta on a sealed device (issue 13 §3b)
        rig = make_encdelta_rig(tmp, old, slot_size=slot)
        erel = encrypted_delta_release(rig.key, old, new, 6)
        server = InProcessServer(envelope=erel.envelope)
        erel.serve(server)
    else:
        rig = make_delta_rig(tmp, old, slot_size=slot, seal=seal)
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
        f"{'pair':<11} {'full':>8} {'delta':>8} {'sealed':>8} {'enc+seal':>8} "
        f"{'blocks full/delta/enc':>22}"
        f"   goal: delta install <= 65536 (of which LZMA state {LZMA_STATE})"
    )
    # delta; the same on a sealed device (slots encrypted at rest); an encrypted delta
    # on a sealed device (the patch decrypted while it streams, issue 13 §3b).
    kinds = ((False, False, False), (True, False, False), (True, False, True), (True, True, True))
    for name in PAIRS:
        cells = []
        for n, (by_delta, encrypted, seal) in enumerate(kinds):
            where = tmp / f"mem-{name}-{n}"
            where.mkdir()
            cells.append(asyncio.run(_update_peak(where, name, by_delta, encrypted, seal)))
        (full, fo, fb), (dp, do, db), (sp, so, _), (ep, eo, eb) = cells
        assert Outcome.UPDATED == fo == do == so == eo, (fo, do, so, eo)
        ok = "met" if max(dp, sp, ep) <= 65536 else "NOT met"
        print(
            f"{name:<11} {full:>8} {dp:>8} {sp:>8} {ep:>8} {fb:>8}/{db}/{eb:<8}   {ok}",
            flush=True,
        )


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


def link(base: Path, name: str = "esp8266", skip_full: bool = False) -> None:
    old, new = pair(name)
    print(f"\n3. {name} by delta over DTLS, 100 ms RTT, lock-step (run_once)")
    devices = {
        "bench-delta": (CLASS_A, bytes(range(16))),
        "bench-full": (CLASS_A, bytes(range(16, 32))),
        "bench-encdelta": (CLASS_B, bytes(range(32, 48))),
        "bench-encfull": (CLASS_B, bytes(range(48, 64))),
    }
    runs = ["bench-delta", "bench-encdelta"]
    if not skip_full:
        runs = ["bench-full", "bench-delta", "bench-encfull", "bench-encdelta"]
    setup = make_setup(
        base, devices=[DeviceSpec(d, c, psk=p) for d, (c, p) in devices.items() if d in runs]
    )
    key = setup.key
    factory = {
        c: setup.release(c, 1, b"factory image".ljust(4096, b".")) for c in (CLASS_A, CLASS_B)
    }

    def env(
        image: bytes,
        seq: int,
        patch: delta.DeltaInfo | None = None,
        klass: str = CLASS_A,
        enc: tuple[bytes, bytes] | None = None,  # the image's (info, ciphertext)
        encp: EncryptedPatch | None = None,
    ) -> bytes:
        rel = Release(hashlib.sha256(image).digest(), len(image), VENDOR, klass, seq)
        if enc is not None:
            uri = ids.image_uri(hashlib.sha256(enc[1]).digest())
            rel = dataclasses.replace(rel, uri=uri, encryption_info=enc[0])
        return suit.encode_envelope(build_envelope(rel, key, patch=patch, encrypted_patch=encp))

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
    # Class B: the same pair, v3 and its delta encrypted (A128CTR, class KEK).
    recipient = [encryption.KekRecipient(KEK, b"class-kek")]
    img_info, img_ct = encryption.encrypt(new, recipient, os.urandom)
    patch_info, patch_ct = encryption.encrypt(p, recipient, os.urandom)
    (files / "v3.enc").write_bytes(img_ct)
    (files / "v3.patch.enc").write_bytes(patch_ct)
    (files / "b2.suit").write_bytes(env(old, 2, klass=CLASS_B))
    (files / "b3.suit").write_bytes(env(new, 3, klass=CLASS_B, enc=(img_info, img_ct)))
    encp = EncryptedPatch(patch_info, ids.image_uri(hashlib.sha256(patch_ct).digest()))
    b3d = env(new, 3, info, klass=CLASS_B, enc=(img_info, img_ct), encp=encp)
    (files / "b3d.suit").write_bytes(b3d)
    flashes = {}
    for device_id in runs:
        klass, psk = devices[device_id]
        flashes[device_id] = base / f"{device_id}.flash"
        provision(
            flashes[device_id],
            device_id=device_id,
            psk=psk,
            vendor_domain=VENDOR,
            class_info=klass,
            anchors_pem=(setup.key_pub.read_bytes(),),
            factory_image=factory[klass].image,
            factory_envelope=factory[klass].envelope,
            slot_size=-(-max(len(old), len(new)) // 4096) * 4096 + 32 * 1024,
            decryption_keks=(KEK,) if klass == CLASS_B else (),
            seal=klass == CLASS_B,
        )
    with running_server(setup.data) as server:
        from server_helpers import cli_ok

        cli_ok("publish", "--data", setup.data, files / "v2.suit", files / "old.bin")
        cli_ok("publish", "--data", setup.data, files / "b2.suit", files / "old.bin")
        # The delta devices run v1.9.4 and say so (their reports carry seq 2).
        for device_id in ("bench-delta", "bench-encdelta"):
            psk = devices[device_id][1]
            transport = CoapTransport(server.uri, device_id, psk)
            d = DeviceAgent(flashes[device_id], server.uri, transport=transport)

            async def first(d: DeviceAgent = d, t: CoapTransport = transport) -> Outcome:
                try:
                    return (await d.run_once()).outcome
                finally:
                    await d.close()
                    await t.close()

            assert asyncio.run(first()) == Outcome.UPDATED
        cli_ok("publish", "--data", setup.data, files / "v3.suit", files / "new.bin",
               "--delta", files / "v3d.suit", files / "v3.patch")  # fmt: skip
        cli_ok("publish", "--data", setup.data, files / "b3.suit", files / "v3.enc",
               "--delta", files / "b3d.suit", files / "v3.patch.enc")  # fmt: skip
        time.sleep(1.5)  # the server's store view notices the new release
        rows = {}
        labels = {
            "bench-full": "full",
            "bench-delta": "delta",
            "bench-encfull": "encrypted full",
            "bench-encdelta": "encrypted delta",
        }
        for device_id in runs:
            spent, air, outcome = asyncio.run(
                _link_run(flashes[device_id], device_id, devices[device_id][1], server.port)
            )
            rows[device_id] = spent
            what = labels[device_id]
            print(f"{what:<16}: {spent:7.1f} s, {air:>9} B on the air  ({outcome})", flush=True)
        if "bench-full" in rows:
            ratio = rows["bench-delta"] / rows["bench-full"]
            ok = "met" if ratio <= 0.2 else "NOT met"
            print(f"delta/full time = {ratio:.3f} (goal <= 0.2: {ok})")
            enc = rows["bench-encdelta"] / rows["bench-encfull"]
            print(f"encrypted delta/encrypted full time = {enc:.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-link", action="store_true", help="skip the DTLS link runs")
    parser.add_argument(
        "--link-pair", choices=sorted(PAIRS), default="esp8266", help="the pair sent over the link"
    )
    parser.add_argument(
        "--skip-full", action="store_true", help="link: only the delta and encrypted delta rows"
    )
    args = parser.parse_args(argv)
    if not DELTA_DIR.is_dir():
        print(f"{DELTA_DIR} not found (set OTACOAP_SHARED)")
        return 1
    base = Path(tempfile.mkdtemp(prefix="bench-delta-"))
    try:
        sizes()
        memory(base)
        if not args.no_link:
            link(base / "link", args.link_pair, args.skip_full)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
