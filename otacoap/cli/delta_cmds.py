"""The operator's delta commands: `manifest build --delta-from` and `publish --delta`.

A delta envelope is built for one release (same sequence number, same resulting image)
from the image the devices run now (OLD.bin); the patch is written next to it and is
published with it (docs/decisions/delta-updates.md has the SUIT encoding).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from ..cliargs import CliError
from ..core import delta, suit, trust
from ..core.build import Release, build_envelope
from ..fsutil import atomic_write, read_capped
from ..store import Publisher
from ..store.publish_delta import Published, publish_file_any

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


def build_delta(args: argparse.Namespace, release: Release) -> tuple[suit.Envelope, str]:
    """The (unsigned) delta envelope for `release` and a line about its patch (written
    to disk); `manifest build` signs or MACs it like a full envelope."""
    if release.encryption_info is not None:
        raise CliError("--delta-from cannot be combined with payload encryption")
    from .. import patching  # detools: only the operator's build needs it

    old = read_capped(args.delta_from, MAX_IMAGE_FILE)
    new = read_capped(args.image, MAX_IMAGE_FILE)
    if not old:
        raise CliError(f"{args.delta_from}: the image is empty")
    patch = patching.create_patch(old, new, args.compression)
    out = patch_path(args)
    atomic_write(out, patch)
    info = delta.DeltaInfo(suit.SuitDigest.of(old), len(old), suit.SuitDigest.of(patch), len(patch))
    envelope = build_envelope(release, patch=info, fallback=not args.no_fallback)
    return envelope, (
        f"patch {out}: {len(patch)} bytes ({100 * len(patch) / len(new):.1f} % of the image), "
        f"from sha256 {info.source_digest.value.hex()}"
    )


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
