"""The operator's delta commands: `manifest build --delta-from` and `publish --delta`.

A delta envelope is built for one release (same sequence number, same resulting image)
from the image the devices run now (OLD.bin); the patch is written next to it and is
published with it (docs/decisions/delta-updates.md has the SUIT encoding).

An encrypted release's delta (`--encrypt-for`/`--kek` with `--delta-from`) is encrypted
too: the patch under a fresh CEK for the same recipients, written as ciphertext to
PATCH; the fallback is the release's own ciphertext with its own encryption info, read
from the release's full envelope (`--full-envelope`): its CEK cannot be re-derived by
the operator (ECDH-ES recipients), so it is copied, not re-encrypted.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from ..cliargs import CliError
from ..core import delta, encryption, ids, suit, trust
from ..core.build import EncryptedPatch, Release, build_envelope
from ..core.errors import OtaError
from ..fsutil import atomic_write, read_capped
from ..store import Publisher
from ..store.publish_delta import Published, publish_file_any
from .encrypt_cmds import BuildCrypto

MAX_IMAGE_FILE = 64 * 1024 * 1024


def add_build_arguments(b: argparse.ArgumentParser) -> None:
    b.add_argument(
        "--delta-from",
        metavar="OLD",
        help="build a delta envelope: a detools patch from the image OLD (what devices run) "
        "to IMAGE, with the full IMAGE as the fallback",
    )
    b.add_argument("--patch-out", metavar="PATCH", help="where the patch goes (default: OUT.patch)")
    b.add_argument(
        "--compression",
        choices=["lzma", "none"],
        default="lzma",
        help="patch compression (lzma: 8 KiB dictionary, what small devices can hold)",
    )
    b.add_argument(
        "--full-envelope",
        metavar="RELEASE.suit",
        help="an encrypted delta: the release's full (encrypted) envelope, whose ciphertext "
        "and encryption info become the fallback",
    )
    b.add_argument(
        "--no-fallback",
        action="store_true",
        help="leave the full image out of the delta envelope (devices that cannot use the "
        "patch refuse it instead)",
    )


def describe_deltas(summary: trust.Summary) -> list[str]:
    """`manifest inspect` lines for the delta fetches of a manifest (none: [])."""
    lines = []
    for fetch in summary.fetches:
        info = fetch.delta
        if info is not None:
            fmt = delta.FORMAT_NAMES.get(info.format, str(info.format))
            lines.append(
                f"delta: component {fetch.component}, {fmt} patch {info.patch_size} bytes "
                f"sha256 {info.patch_digest.value.hex()}, uri {fetch.uri or '-'}, "
                f"from source {info.source_size} bytes sha256 {info.source_digest.value.hex()}"
            )
    return lines


def patch_path(args: argparse.Namespace) -> str:
    """Where `manifest build --delta-from` writes the patch."""
    return str(args.patch_out or f"{args.out}.patch")


def check_encrypted_delta_options(args: argparse.Namespace, encrypts: bool) -> None:
    """`manifest build --delta-from`: the options an (encrypted) delta needs, checked
    before anything is written."""
    if not encrypts:
        if args.full_envelope:
            raise CliError("--full-envelope is for encrypted deltas (--encrypt-for or --kek)")
        return
    if args.payload_out:
        raise CliError(
            "an encrypted delta writes its encrypted patch to --patch-out, not --payload-out"
        )
    if not args.full_envelope:
        raise CliError(
            "an encrypted delta needs --full-envelope RELEASE.suit (the release's encrypted "
            "full envelope: the fallback and its encryption info come from it)"
        )


def encrypted_fallback(args: argparse.Namespace, release: Release) -> Release:
    """`release` with the URI and encryption info of the release's full envelope.

    The operator's own file, read for its parameters (the static walk `manifest inspect`
    uses; nothing is trusted from it: the new envelope is signed over what is copied,
    and publish checks that the fallback is the published release's). It must be the
    same release: same sequence number and the same plaintext image."""
    from .manifest_cmds import read_envelope_file

    try:
        envelope = suit.decode_envelope(read_envelope_file(args.full_envelope))
        summary = trust.summarize(envelope)
    except OtaError as exc:
        raise CliError(f"{args.full_envelope}: {exc}") from None
    fetches = [f for f in summary.fetches if f.delta is None]
    if len(fetches) != 1 or fetches[0].encryption_info is None or fetches[0].uri is None:
        raise CliError(f"{args.full_envelope}: not the full envelope of an encrypted release")
    full = fetches[0]
    seq = envelope.manifest.sequence_number
    if seq != release.sequence_number:
        raise CliError(
            f"{args.full_envelope} is seq {seq}, the delta is seq "
            f"{release.sequence_number}: a delta is for the same release"
        )
    if (
        full.digest is None
        or full.digest.value != release.image_digest
        or (full.size != release.image_size)
    ):
        raise CliError(f"{args.full_envelope}'s image is not {args.image}")
    return replace(release, uri=full.uri, encryption_info=full.encryption_info)


def build_delta(
    args: argparse.Namespace, release: Release, crypto: BuildCrypto | None = None
) -> tuple[suit.Envelope, str]:
    """The (unsigned) delta envelope for `release` and a line about its patch (written
    to disk); `manifest build` signs or MACs it like a full envelope. With `crypto`
    recipients the patch is written encrypted (an encrypted delta)."""
    from .. import patching  # detools: only the operator's build needs it

    old = read_capped(args.delta_from, MAX_IMAGE_FILE)
    new = read_capped(args.image, MAX_IMAGE_FILE)
    if not old:
        raise CliError(f"{args.delta_from}: the image is empty")
    patch = patching.create_patch(old, new, args.compression)
    out = patch_path(args)
    info = delta.DeltaInfo(suit.SuitDigest.of(old), len(old), suit.SuitDigest.of(patch), len(patch))
    encrypted = None
    written = patch
    if crypto is not None and crypto.encrypts:
        if release.encryption_info is None:
            raise CliError("an encrypted delta needs the encrypted release's --full-envelope")
        # A fresh CEK and IV for the patch (never the image's); digests stay plaintext's.
        enc_info, written = encryption.encrypt(
            patch, crypto.recipients, os.urandom, crypto.content_alg
        )
        encrypted = EncryptedPatch(enc_info, ids.image_uri(hashlib.sha256(written).digest()))
    atomic_write(out, written)
    envelope = build_envelope(
        release, patch=info, fallback=not args.no_fallback, encrypted_patch=encrypted
    )
    line = f"patch {out}: {len(patch)} bytes ({100 * len(patch) / len(new):.1f} % of the image)"
    if encrypted is not None:
        alg = encryption.ALG_NAMES[crypto.content_alg] if crypto else ""
        line += f", encrypted {alg}: {len(written)} bytes, uri {encrypted.uri}"
    return envelope, f"{line}, from sha256 {info.source_digest.value.hex()}"


def publish_local(
    publisher: Publisher,
    envelope: bytes,
    path: Path | Sequence[Path],
    deltas: list[list[str]],
    actor: str,
    *,
    make_current: bool = True,
) -> list[Published]:
    """A release (or a delta) and then the deltas given with --delta, in order.

    `make_current` (publish --rollout) applies to the release; a delta follows its
    release (whoever is served the release is served the delta)."""
    from .manifest_cmds import read_envelope_file

    done = [publish_file_any(publisher, envelope, path, actor, make_current=make_current)]
    for env_file, patch_file in deltas:
        done.append(
            publish_file_any(publisher, read_envelope_file(env_file), Path(patch_file), actor)
        )
    return done
