"""Payload encryption on the operator's command line (draft-ietf-suit-firmware-encryption).

* `manifest build` options (added by `add_build_options`): `--encrypt-for RECIPIENT.pub`
  (ECDH-ES+A128KW, repeatable: one per device or per class key), `--kek FILE` (A128KW,
  repeatable), `--content-alg`, `--payload-out` (the ciphertext the server stores and
  serves: the server never needs the plaintext), and the signer side of the SUIT MTI
  profiles: `--alg`, `--profile`, `--hmac-key`.
* `manifest decrypt ENVELOPE`: decrypt the payload an envelope's encryption info
  describes, with a KEK or a recipient's private key.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from dataclasses import dataclass

from ..cliargs import CliError
from ..core import cose, encryption, ids, mti, suit
from ..fsutil import atomic_write, read_capped

MAX_KEY_FILE = 64 * 1024
MAX_IMAGE_FILE = 1 << 30  # the operator's whole image is read (and encrypted) at once
MAX_PAYLOAD_FILE = 1 << 30

CONTENT_ALGS = {"a128ctr": encryption.A128CTR, "a128gcm": encryption.A128GCM}


def add_build_options(b: argparse.ArgumentParser) -> None:
    b.add_argument(
        "--alg",
        choices=["es256", "esp256", "eddsa", "ed25519"],
        help="signature algorithm (default: es256 for P-256 keys, ed25519 (-19) for Ed25519)",
    )
    b.add_argument(
        "--profile",
        choices=sorted(mti.PROFILES),
        help="a SUIT MTI profile (draft-ietf-suit-mti): its signature, key exchange and "
        "payload encryption algorithms",
    )
    b.add_argument(
        "--hmac-key",
        metavar="HEXFILE",
        help="authenticate with HMAC 256/256 (COSE_Mac0) under this hex key",
    )
    b.add_argument(
        "--encrypt-for",
        action="append",
        default=[],
        metavar="RECIPIENT.pub",
        help="encrypt the payload for this P-256 public key (ECDH-ES+A128KW; repeatable)",
    )
    b.add_argument(
        "--kek",
        action="append",
        default=[],
        metavar="FILE",
        help="encrypt the payload under this A128KW key (16 bytes or 32 hex; repeatable)",
    )
    b.add_argument("--kek-id", metavar="TEXT", help="kid to put on the A128KW recipients")
    b.add_argument(
        "--content-alg",
        choices=sorted(CONTENT_ALGS),
        help="payload encryption (default: the profile's, else a128ctr, the streaming mode)",
    )
    b.add_argument(
        "--payload-out",
        metavar="FILE",
        help="where to write the encrypted payload (publish this file, not the image)",
    )


def _read(path: str, cap: int) -> bytes:
    try:
        return read_capped(path, cap)
    except ValueError as exc:
        raise CliError(str(exc)) from None


@dataclass(frozen=True)
class BuildCrypto:
    """What `manifest build` signs with and how it encrypts, resolved from the options."""

    alg: int | None
    hmac_key: bytes | None
    recipients: tuple[encryption.RecipientSpec, ...]
    content_alg: int
    payload_out: str | None

    @property
    def encrypts(self) -> bool:
        return bool(self.recipients)


def resolve(args: argparse.Namespace, key: cose.SigningKey | None) -> BuildCrypto:
    """Check the options against each other and the profile; one-line errors."""
    profile = mti.profile(args.profile) if args.profile else None
    alg = cose.alg_by_name(args.alg) if args.alg else None
    hmac_key = None
    if args.hmac_key:
        text = _read(args.hmac_key, MAX_KEY_FILE).decode("ascii", "replace").strip()
        try:
            hmac_key = bytes.fromhex(text)
        except ValueError:
            raise CliError(f"{args.hmac_key}: not a hex HMAC key") from None
        cose.hmac_anchor(hmac_key)  # checks the length
        if key is not None:
            raise CliError("give either --key or --hmac-key, not both")
    recipients: list[encryption.RecipientSpec] = []
    for path in args.encrypt_for:
        recipients.append(
            encryption.EcdhRecipient(encryption.load_ec_public(_read(path, MAX_KEY_FILE)))
        )
    kid = args.kek_id.encode("utf-8") if args.kek_id else None
    for path in args.kek:
        _, kek = encryption.load_kek(_read(path, MAX_KEY_FILE))
        recipients.append(encryption.KekRecipient(kek, kid))
    content = CONTENT_ALGS[args.content_alg] if args.content_alg else None
    if profile is not None:
        if alg is not None and alg != profile.auth:
            raise CliError(f"--alg {args.alg} contradicts profile {profile.name}")
        if content is not None and content != profile.content:
            raise CliError(f"--content-alg {args.content_alg} contradicts profile {profile.name}")
        content = profile.content
        if profile.signing_kind == "hmac":
            if hmac_key is None:
                raise CliError(f"profile {profile.name} authenticates with --hmac-key")
        else:
            if key is None or key.kind != profile.signing_kind:
                raise CliError(f"profile {profile.name} signs with a {profile.signing_kind} --key")
            alg = profile.auth
        if not recipients:
            raise CliError(f"profile {profile.name} encrypts: give --encrypt-for or --kek")
        wanted = (
            encryption.KekRecipient
            if profile.key_exchange == encryption.A128KW
            else encryption.EcdhRecipient
        )
        if any(not isinstance(r, wanted) for r in recipients):
            flag = "--kek" if wanted is encryption.KekRecipient else "--encrypt-for"
            raise CliError(f"profile {profile.name} distributes keys with {flag} only")
    if alg is not None and key is not None and alg not in cose.algs_for(key.kind):
        raise CliError(f"--alg {args.alg} does not fit a {key.kind} key")
    if recipients and not args.payload_out and not getattr(args, "delta_from", None):
        raise CliError("an encrypted build needs --payload-out FILE for the ciphertext")
    if args.payload_out and not recipients:
        raise CliError("--payload-out is for encrypted builds (--encrypt-for or --kek)")
    return BuildCrypto(
        alg, hmac_key, tuple(recipients), content or encryption.A128CTR, args.payload_out
    )


@dataclass(frozen=True)
class EncryptedImage:
    info: bytes
    ciphertext_sha256: bytes
    ciphertext_size: int
    uri: str


def encrypt_image(image_path: str, crypto: BuildCrypto, uri: str | None) -> EncryptedImage:
    """Encrypt the image and write the ciphertext (the payload to publish)."""
    assert crypto.payload_out is not None
    plaintext = _read(image_path, MAX_IMAGE_FILE)
    info, ciphertext = encryption.encrypt(
        plaintext, crypto.recipients, os.urandom, crypto.content_alg
    )
    atomic_write(crypto.payload_out, ciphertext)
    digest = hashlib.sha256(ciphertext).digest()
    return EncryptedImage(info, digest, len(ciphertext), uri or ids.image_uri(digest))


def authenticate(
    envelope: suit.Envelope, key: cose.SigningKey | None, crypto: BuildCrypto
) -> suit.Envelope:
    """Sign (COSE_Sign1 with the chosen alg) or MAC (COSE_Mac0) the envelope."""
    from ..core.build import sign_envelope

    if crypto.hmac_key is not None:
        block = suit.AuthBlock(cose.mac0(envelope.authentication.digest_raw, crypto.hmac_key))
        return suit.with_blocks(envelope, (*envelope.authentication.blocks, block))
    if key is None:
        return envelope
    return sign_envelope(envelope, key, crypto.alg)


def describe_encryption(envelope: suit.Envelope) -> list[str]:
    """`manifest inspect` lines for each encrypted payload the manifest names."""
    lines = []
    for found in encryption.encrypted_parameters(envelope):
        try:
            info = encryption.parse_encryption_info(found.info)
        except Exception as exc:  # inspect shows what is there, even when it is broken
            lines.append(f"encrypted payload: component {found.component}, unreadable: {exc}")
            continue
        recipients = ", ".join(
            encryption.ALG_NAMES[r.alg] + (f" kid {r.kid!r}" if r.kid is not None else "")
            for r in info.recipients
        )
        where = "in the manifest" if found.content is not None else "fetched"
        lines.append(
            f"encrypted payload: component {found.component}, "
            f"{encryption.ALG_NAMES[info.content_alg]}, {where}, "
            f"recipients: {recipients or 'none (COSE_Encrypt0)'}"
        )
    return lines


# --- manifest decrypt ------------------------------------------------------------------


def register_decrypt(msub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    d = msub.add_parser(
        "decrypt",
        help="decrypt the payload an envelope's encryption info describes",
        description="Find suit-parameter-encryption-info in ENVELOPE, unwrap the content "
        "key with --kek or --key, and decrypt the payload (the envelope's own "
        "suit-parameter-content, or --payload FILE, the fetched ciphertext).",
    )
    d.add_argument("envelope", metavar="ENVELOPE", help="envelope (CBOR or hex)")
    d.add_argument("--kek", action="append", default=[], metavar="FILE", help="A128KW key")
    d.add_argument(
        "--key",
        action="append",
        default=[],
        metavar="PRIVATE.pem",
        help="recipient's P-256 private key (ECDH-ES+A128KW)",
    )
    d.add_argument("--payload", metavar="FILE", help="the fetched ciphertext (raw or hex)")
    d.add_argument("-o", "--out", metavar="OUT", help="write the plaintext here (default: stdout)")
    d.set_defaults(handler=cmd_decrypt, _cmd_path=["manifest", "decrypt"])


def _read_maybe_hex(path: str) -> bytes:
    data = _read(path, MAX_PAYLOAD_FILE)
    text = data.strip()
    if text and len(text) % 2 == 0:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    return data


def cmd_decrypt(args: argparse.Namespace) -> int:
    from .manifest_cmds import read_envelope_file

    keks = tuple(encryption.load_kek(_read(p, MAX_KEY_FILE)) for p in args.kek)
    privs = tuple(encryption.load_ec_private(_read(p, MAX_KEY_FILE)) for p in args.key)
    keys = encryption.DecryptionKeys(keks=keks, ec_private=privs)
    if not keys:
        raise CliError("no decryption key given (use --kek FILE or --key PRIVATE.pem)")
    envelope = suit.decode_envelope(read_envelope_file(args.envelope))
    found = encryption.encrypted_parameters(envelope)
    if not found:
        raise CliError(f"{args.envelope}: the manifest names no encrypted payload")
    params = found[0]
    if args.payload:
        ciphertext = _read_maybe_hex(args.payload)
        # An encrypted delta names two payloads (the patch, the full image), each with
        # its own key: take the one whose URI names this ciphertext's SHA-256.
        named = ids.image_uri(hashlib.sha256(ciphertext).digest())
        params = next((f for f in found if f.uri == named), params)
    elif params.content is not None:
        ciphertext = params.content
    else:
        raise CliError("the payload is fetched, not in the manifest: give --payload FILE")
    info = encryption.parse_encryption_info(params.info)
    plaintext = encryption.decrypt(info, keys, ciphertext)
    if args.out:
        atomic_write(args.out, plaintext)
        sha = hashlib.sha256(plaintext).hexdigest()
        alg = encryption.ALG_NAMES[info.content_alg]
        print(f"wrote {args.out}: {len(plaintext)} bytes, {alg}, sha256 {sha}")
    else:
        sys.stdout.buffer.write(plaintext)
        sys.stdout.buffer.flush()
    return 0
