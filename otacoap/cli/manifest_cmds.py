"""`otacoap keygen` and `otacoap manifest build|sign|inspect|verify|decrypt`."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import string
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..cliargs import CliError
from ..core import cbor, cose, ids, suit, trust
from ..core.build import (
    DEVICE_COMPONENTS,
    ComponentImage,
    Release,
    build_envelope,
    check_release_names,
    sign_envelope,
)
from ..core.errors import AuthenticationError, ManifestError, OtaError
from ..fsutil import atomic_write, read_capped
from . import delta_cmds, encrypt_cmds
from .output import json_parent

MAX_ENVELOPE_FILE = 4 * cbor.DEFAULT_MAX_SIZE  # a hex file is twice as long, plus slack
MAX_KEY_FILE = 64 * 1024


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "keygen",
        help="generate a manifest signing key pair",
        description="Write NAME (private key, PEM, mode 0600) and NAME.pub (public key, PEM).",
    )
    p.add_argument(
        "--alg",
        choices=["es256", "ed25519"],
        default="es256",
        help="key type (default: es256, i.e. ECDSA P-256)",
    )
    p.add_argument("--out", required=True, metavar="NAME", help="output file name")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(handler=cmd_keygen, _cmd_path=["keygen"])

    m = sub.add_parser("manifest", help="build, sign, inspect and verify SUIT envelopes")
    msub = m.add_subparsers(dest="manifest_command", metavar="SUBCOMMAND", parser_class=type(m))
    msub.required = True

    b = msub.add_parser(
        "build",
        help="build a SUIT envelope for a firmware image",
        description="Build a draft-ietf-suit-manifest-34 envelope that "
        "installs IMAGE on devices of one vendor and class.",
    )
    b.add_argument(
        "--image",
        required=True,
        action="append",
        metavar="FILE",
        help="the firmware image; give it twice for a two-component release (component 0, "
        "then component 1, installed together: docs/decisions/multi-component.md)",
    )
    b.add_argument(
        "--vendor-domain",
        required=True,
        metavar="DOMAIN",
        help="vendor domain; vendor-id = UUID5(DNS, DOMAIN)",
    )
    b.add_argument(
        "--class-info",
        required=True,
        metavar="TEXT",
        help="device class; class-id = UUID5(vendor-id, TEXT)",
    )
    b.add_argument(
        "--seq",
        required=True,
        type=_uint,
        metavar="N",
        help="sequence number (must grow with every release)",
    )
    b.add_argument("--uri", help="payload URI (default: the server-relative /fw/<id>)")
    b.add_argument(
        "--expires-in",
        type=int,
        metavar="SECONDS",
        help="signed expiry this many seconds from now (manifest key -25601); devices "
        "with a trusted clock refuse the manifest after it (default: no expiry)",
    )
    b.add_argument("--key", metavar="PRIVATE", help="sign with this private key (PEM)")
    b.add_argument("-o", "--out", required=True, metavar="OUT", help="output envelope")
    b.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    encrypt_cmds.add_build_options(b)
    delta_cmds.add_build_arguments(b)
    b.set_defaults(handler=cmd_build, _cmd_path=["manifest", "build"])

    s = msub.add_parser("sign", help="add a signature to an envelope")
    s.add_argument("--key", required=True, metavar="PRIVATE", help="private key (PEM)")
    s.add_argument(
        "--alg",
        choices=["es256", "esp256", "eddsa", "ed25519"],
        help="signature algorithm (default: es256 for P-256 keys, ed25519 (-19) for Ed25519)",
    )
    s.add_argument("envelope", metavar="IN", help="envelope (CBOR or hex)")
    s.add_argument("-o", "--out", required=True, metavar="OUT", help="output envelope")
    s.set_defaults(handler=cmd_sign, _cmd_path=["manifest", "sign"])

    i = msub.add_parser(
        "inspect", parents=[json_parent()], help="show an envelope in readable form"
    )
    i.add_argument("envelope", metavar="FILE", help="envelope (CBOR or hex)")
    i.set_defaults(handler=cmd_inspect, _cmd_path=["manifest", "inspect"])

    v = msub.add_parser(
        "verify",
        help="check that an envelope is authentic and well-formed",
        description="Exit 0 when FILE is authentic (signed by one of the "
        "keys) and well-formed, 1 otherwise.",
    )
    v.add_argument("envelope", metavar="FILE", help="envelope (CBOR or hex)")
    v.add_argument(
        "--key",
        action="append",
        default=[],
        metavar="PUBLIC.pem",
        help="trusted public key (repeatable); a private key is refused",
    )
    v.add_argument(
        "--hmac-key",
        action="append",
        default=[],
        metavar="HEXFILE",
        help="trusted HMAC 256/256 key, as a file of hex (repeatable)",
    )
    v.add_argument("--json", action="store_true", help="print the result as one JSON object")
    v.set_defaults(handler=cmd_verify, _cmd_path=["manifest", "verify"])

    encrypt_cmds.register_decrypt(msub)


def _uint(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value < 1 << 64:
        raise argparse.ArgumentTypeError(f"{text} is not an unsigned 64-bit integer")
    return value


def read_envelope_file(path: str) -> bytes:
    """Raw CBOR, or a text file holding its hex (as the shared vectors are)."""
    try:
        data = read_capped(path, MAX_ENVELOPE_FILE)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    text = data.strip()
    if text and all(chr(c) in string.hexdigits + string.whitespace for c in text):
        try:
            return bytes.fromhex(text.decode("ascii"))
        except ValueError:
            raise CliError(f"{path}: looks like hex but is not valid hex") from None
    return data


@contextlib.contextmanager
def naming(path: str) -> Iterator[None]:
    """Refusals about an envelope file name the file, and say when it is not a SUIT
    envelope at all (CBOR or structure), rather than what the decoder tripped on alone."""
    try:
        yield
    except OtaError as exc:
        what = "not a valid SUIT envelope: " if isinstance(exc, ManifestError) else ""
        exc.message = f"{path}: {what}{exc.message}"
        exc.args = (exc.message,)
        raise


def load_signing_key(path: str) -> cose.SigningKey:
    return cose.load_private_key(_read_key(path))


def load_anchor(path: str) -> cose.TrustAnchor:
    """A public key file as a trust anchor; a private key is refused, naming the file."""
    try:
        return cose.load_public_key(_read_key(path))
    except AuthenticationError as exc:
        raise CliError(f"{path}: {exc}") from None


def _read_key(path: str) -> bytes:
    try:
        return read_capped(path, MAX_KEY_FILE)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _refuse_overwrite(paths: list[str], force: bool) -> None:
    for p in paths:
        if os.path.exists(p) and not force:
            raise CliError(f"{p} exists (use --force to overwrite)")


def cmd_keygen(args: argparse.Namespace) -> int:
    pub = args.out + ".pub"
    _refuse_overwrite([args.out, pub], args.force)
    key = cose.generate_key(args.alg)
    atomic_write(pub, key.public.public_pem(), mode=0o644)
    atomic_write(args.out, key.pem, mode=0o600)
    print(f"wrote {args.out} (private, 0600) and {pub}; key id {key.public.key_id}")
    return 0


def _more_components(args: argparse.Namespace, files: list[str]) -> tuple[ComponentImage, ...]:
    """Images 2.. of `--image` as components 1.. (each served as its own /fw/<id>)."""
    if not files:
        return ()
    if len(files) > len(DEVICE_COMPONENTS) - 1:
        raise CliError(f"at most {len(DEVICE_COMPONENTS)} images (components) per release")
    if args.uri is not None:
        raise CliError("--uri names one image; a multi-component release uses /fw/<id> URIs")
    out = []
    for path, component in zip(files, DEVICE_COMPONENTS[1:], strict=False):
        digest, size = _hash_file(path)
        if size == 0:
            raise CliError(f"{path}: the image is empty")
        out.append(ComponentImage(digest, size, None, component))
    return tuple(out)


def cmd_build(args: argparse.Namespace) -> int:
    _refuse_overwrite([args.out], args.force)
    image, *more_images = args.image
    args.image = image
    digest, size = _hash_file(image)
    if size == 0:
        raise CliError(f"{image}: the image is empty")
    more = _more_components(args, more_images)
    key = load_signing_key(args.key) if args.key else None
    expires = None
    if args.expires_in is not None:
        if args.expires_in <= 0:
            raise CliError("--expires-in must be a positive number of seconds")
        expires = int(time.time()) + args.expires_in
    check_release_names(args.vendor_domain, args.uri)
    crypto = encrypt_cmds.resolve(args, key)
    if args.delta_from:
        delta_cmds.check_encrypted_delta_options(args, crypto.encrypts)
        if more:
            raise CliError("--delta-from cannot be combined with a multi-component release")
        _refuse_overwrite([delta_cmds.patch_path(args)], args.force)
    release = Release(
        digest,
        size,
        args.vendor_domain,
        args.class_info,
        args.seq,
        args.uri,
        expires=expires,
        more=more,
    )
    encrypted = None
    if crypto.encrypts and more:
        raise CliError("an encrypted multi-component release is not supported")
    if crypto.encrypts and args.delta_from:  # the fallback: the release's own ciphertext
        release = delta_cmds.encrypted_fallback(args, release)
    elif crypto.encrypts:
        encrypted = encrypt_cmds.encrypt_image(args.image, crypto, args.uri)
        release = replace(release, uri=encrypted.uri, encryption_info=encrypted.info)
    patch_line = ""
    if args.delta_from:
        unsigned, patch_line = delta_cmds.build_delta(args, release, crypto)
    else:
        unsigned = build_envelope(release)
    envelope = encrypt_cmds.authenticate(unsigned, key, crypto)
    data = suit.encode_envelope(envelope)
    atomic_write(args.out, data)
    if crypto.hmac_key is not None:
        signed = "MACed (HMAC 256/256)"
    elif key is not None:
        alg = crypto.alg if crypto.alg is not None else key.default_alg
        signed = f"signed {cose.ALG_NAMES[alg]} with key {key.public.key_id}"
    else:
        signed = "UNSIGNED"
    if patch_line:
        print(patch_line)
    print(
        f"wrote {args.out}: {len(data)} bytes, seq {args.seq}, image {size} bytes "
        f"sha256 {digest.hex()}, uri {release.uri or ids.image_uri(digest)}, {signed}"
    )
    for i, part in enumerate(more, start=1):
        print(
            f"  component {i}: image {part.image_size} bytes sha256 {part.image_digest.hex()}, "
            f"uri {ids.image_uri(part.image_digest)}"
        )
    if encrypted is not None:
        print(
            f"wrote {crypto.payload_out}: the encrypted payload to publish, "
            f"{encrypted.ciphertext_size} bytes, sha256 {encrypted.ciphertext_sha256.hex()}"
        )
    return 0


def _hash_file(path: str) -> tuple[bytes, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            h.update(chunk)
            size += len(chunk)
    return h.digest(), size


def cmd_sign(args: argparse.Namespace) -> int:
    key = load_signing_key(args.key)
    with naming(args.envelope):
        envelope = suit.decode_envelope(read_envelope_file(args.envelope))
    alg = cose.alg_by_name(args.alg) if args.alg else None
    if alg is not None and alg not in cose.algs_for(key.kind):
        raise CliError(f"--alg {args.alg} does not fit a {key.kind} key")
    try:
        signed = sign_envelope(envelope, key, alg)
    except ValueError as exc:
        raise ManifestError(str(exc)) from None
    data = suit.encode_envelope(signed)
    atomic_write(args.out, data)
    print(f"wrote {args.out}: {len(data)} bytes, signed with key {key.public.key_id}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    data = read_envelope_file(args.envelope)
    with naming(args.envelope):
        envelope = suit.decode_envelope(data)
    m = envelope.manifest
    summary = trust.summarize(envelope)
    images, vendors, classes = summary.images, summary.vendor_ids, summary.class_ids
    if args.json:
        print(json.dumps(_inspection(data, envelope, summary), sort_keys=True))
        return 0
    out = sys.stdout
    print(
        f"envelope: {len(data)} bytes, {'tagged 107' if envelope.tagged else 'untagged'}", file=out
    )
    print(
        f"manifest digest: sha256 {envelope.manifest_digest.value.hex()}"
        f"{'' if envelope.manifest_digest == envelope.authentication.digest else ' (MISMATCH)'}",
        file=out,
    )
    print(f"authentication blocks: {len(envelope.authentication.blocks)}", file=out)
    for blk in envelope.authentication.blocks:
        try:
            parsed = cose.parse_block(blk.raw)
            print(
                f"  COSE tag {parsed.tag}, alg {cose.ALG_NAMES.get(parsed.alg, parsed.alg)}",
                file=out,
            )
        except Exception as exc:
            print(f"  unparseable block: {exc}", file=out)
    print(f"sequence number: {m.sequence_number}", file=out)
    print(f"vendor id: {', '.join(ids.uuid_str(v) or v.hex() for v in vendors) or '-'}", file=out)
    print(f"class id: {', '.join(ids.uuid_str(c) or c.hex() for c in classes) or '-'}", file=out)
    for comp_index, comp in enumerate(m.common.components):
        print(f"component {comp_index}: [{', '.join(p.hex() for p in comp)}]", file=out)
    for img in images:
        d = img.digest.value.hex() if img.digest else "-"
        print(
            f"image: component {img.component}, {img.size} bytes, sha256 {d}, uri {img.uri or '-'}",
            file=out,
        )
    for line in encrypt_cmds.describe_encryption(envelope):
        print(line, file=out)
    for line in delta_cmds.describe_deltas(summary):
        print(line, file=out)
    print("\nmanifest (CBOR diagnostic notation):", file=out)
    print(cbor.diagnostic(_expand(cbor.loads(envelope.manifest_raw))), file=out)
    return 0


def _inspection(data: bytes, envelope: suit.Envelope, summary: Any) -> dict[str, Any]:
    """What `inspect` shows, as data (nothing here is verified: see `verify`)."""
    blocks: list[dict[str, Any]] = []
    for blk in envelope.authentication.blocks:
        try:
            parsed = cose.parse_block(blk.raw)
        except OtaError as exc:
            blocks.append({"error": str(exc)})
            continue
        blocks.append({"cose_tag": parsed.tag, "alg": cose.ALG_NAMES.get(parsed.alg, parsed.alg)})
    return {
        "size": len(data),
        "tagged": envelope.tagged,
        "manifest_digest": envelope.manifest_digest.value.hex(),
        "digest_matches": envelope.manifest_digest == envelope.authentication.digest,
        "authentication_blocks": blocks,
        "sequence_number": envelope.manifest.sequence_number,
        "vendor_ids": [ids.uuid_str(v) or v.hex() for v in summary.vendor_ids],
        "class_ids": [ids.uuid_str(c) or c.hex() for c in summary.class_ids],
        "components": [[p.hex() for p in c] for c in envelope.manifest.common.components],
        "images": [
            {
                "component": i.component,
                "size": i.size,
                "digest": i.digest.value.hex() if i.digest else None,
                "uri": i.uri,
            }
            for i in summary.images
        ],
        "encryption": encrypt_cmds.describe_encryption(envelope),
    }


def _expand(value: Any) -> Any:
    """Decode bstr-wrapped CBOR inside the manifest for display (<< >> in EDN)."""
    if isinstance(value, dict):
        return {k: _expand(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v) for v in value]
    if isinstance(value, bytes) and value and value[0] >> 5 in (4, 5):
        try:
            return _expand(cbor.loads(value))
        except ManifestError:
            return value
    return value


def cmd_verify(args: argparse.Namespace) -> int:
    anchors = [load_anchor(p) for p in args.key]
    for path in args.hmac_key:
        text = _read_key(path).decode("ascii", "replace").strip()
        try:
            anchors.append(cose.hmac_anchor(bytes.fromhex(text)))
        except ValueError:
            raise CliError(f"{path}: not a hex HMAC key") from None
    if not anchors:
        raise CliError("no trusted key given (use --key PUBLIC.pem or --hmac-key HEXFILE)")
    data = read_envelope_file(args.envelope)
    try:
        with naming(args.envelope):
            verified = trust.accept(data, trust.TrustPolicy(anchors=tuple(anchors)))
    except OtaError as exc:
        if args.json:
            # A script asked for JSON: it gets JSON whatever the verdict; the one-line
            # error still goes to stderr and the exit code is still 1.
            print(json.dumps({"valid": False, "error": exc.message, "reason": exc.reason.name}))
        raise
    if args.json:
        print(json.dumps(verification_report(verified)))
    else:
        print(
            f"{Path(args.envelope).name}: OK, sequence number {verified.sequence_number}, "
            f"signed by {verified.signer}"
        )
    return 0


def verification_report(v: trust.VerifiedManifest) -> dict[str, Any]:
    m = v.manifest
    return {
        "valid": True,
        "sequence_number": m.sequence_number,
        "manifest_digest": v.manifest_digest.value.hex(),
        "manifest_digest_algorithm": v.manifest_digest.algorithm,
        "signer": v.signer,
        "tagged": v.envelope.tagged,
        "components": [[p.hex() for p in c] for c in m.common.components],
        "images": [
            {
                "component": i.component,
                "digest": i.digest.value.hex() if i.digest else None,
                "size": i.size,
                "uri": i.uri,
            }
            for i in v.images
        ],
        "vendor_id": ids.uuid_str(v.vendor_ids[0]) if v.vendor_ids else None,
        "class_id": ids.uuid_str(v.class_ids[0]) if v.class_ids else None,
        "reference_uri": m.reference_uri,
    }
