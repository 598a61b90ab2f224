"""Identifiers derived from names and digests, each rule in exactly one place."""

from __future__ import annotations

import uuid

# manifest-34 §8.4.8.2: vendor-id = UUID5(DNS namespace, domain);
# class-id = UUID5(vendor-id, class-info).


def vendor_id(domain: str) -> bytes:
    return uuid.uuid5(uuid.NAMESPACE_DNS, domain).bytes


def class_id(vendor: bytes, class_info: str) -> bytes:
    return uuid.uuid5(uuid.UUID(bytes=vendor), class_info).bytes


def class_key_of(vendor_domain: str, class_info: str) -> tuple[bytes, bytes]:
    """(vendor-id, class-id) of a device registered with these names: the key a class's
    releases are filed under, and what its manifests must name (manifest-34 §8.4.8.2)."""
    vendor = vendor_id(vendor_domain)
    return vendor, class_id(vendor, class_info)


def uuid_str(raw: bytes | None) -> str | None:
    return str(uuid.UUID(bytes=raw)) if isinstance(raw, bytes) and len(raw) == 16 else None


# The image resource. The id travels in every Block2 request, so it is short: 64 bits of
# the SHA-256 image digest, hex. It names content, not authority: the server still checks
# that the requesting device has a release with that image (ATTACKS.md #32).
IMAGE_ID_HEX_CHARS = 16
IMAGE_PATH_PREFIX = "fw"


def image_id(digest: bytes) -> str:
    return digest.hex()[:IMAGE_ID_HEX_CHARS]


def image_uri(digest: bytes) -> str:
    """The relative reference `manifest build` puts into a manifest by default."""
    return f"/{IMAGE_PATH_PREFIX}/{image_id(digest)}"


def is_image_id(text: str) -> bool:
    return len(text) == IMAGE_ID_HEX_CHARS and all(c in "0123456789abcdef" for c in text)
