"""Regenerate the example releases in this folder from releases.toml.

Images are deterministic (SHA-256 counter stream seeded by the release name), so their
digests never change. The signing key is generated on first use into .keys/ (ignored by
git: no private key is committed); its public half is written to examples-signing.pub.
Run: .venv/bin/python SUIT_manifests/build_examples.py
"""

from __future__ import annotations

import hashlib
import sys
import tomllib
from pathlib import Path

from otacoap.core import cose, suit, trust
from otacoap.core.build import Release, build_envelope
from otacoap.fsutil import atomic_write

HERE = Path(__file__).resolve().parent
KEY = HERE / ".keys" / "examples-signing.pem"
PUB = HERE / "examples-signing.pub"


def image_bytes(name: str, size: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{name}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def signing_key() -> cose.SigningKey:
    if KEY.exists():
        return cose.load_private_key(KEY.read_bytes())
    KEY.parent.mkdir(mode=0o700, exist_ok=True)
    key = cose.generate_key("es256")
    atomic_write(KEY, key.pem, mode=0o600)
    return key


def main() -> int:
    key = signing_key()
    atomic_write(PUB, key.public.public_pem())
    releases = tomllib.loads((HERE / "releases.toml").read_text())["release"]
    policy = trust.TrustPolicy(anchors=(key.public,))
    for r in releases:
        image = image_bytes(r["name"], r["image_size"])
        release = Release(hashlib.sha256(image).digest(), len(image), r["vendor_domain"],
                          r["class_info"], r["sequence_number"], description=r["description"])
        data = suit.encode_envelope(build_envelope(release, key))
        trust.accept(data, policy)  # never write an example that does not verify
        atomic_write(HERE / f"{r['name']}.bin", image)
        atomic_write(HERE / f"{r['name']}.suit", data)
        print(f"{r['name']}: seq {r['sequence_number']}, image {len(image)} bytes, "
              f"envelope {len(data)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
