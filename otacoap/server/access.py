"""Who is served what: the one authorisation rule of /m and /fw.

A principal comes from the DTLS session (StoreView.principal_of). A device is served
its release and may read that release's image (each component's image of a
multi-component release) and no other, except that a device on a
delta's source image is served that release's delta envelope and may read its patch
too (and the full image, the envelope's fallback; store/deltas.py); an operator is
served neither. Which release: a pinned one (`release assign`), else the newer of its
class's current release and the one a rollout campaign admitted it to
(`store.campaigns.served_release`, through the view's caches). So a device outside a
campaign's open waves, or not admitted yet (window, --max-downloads), keeps what it
had: it is "not yet" told anything new, over its existing session, and its /m
observation is notified when it is admitted. The /m resource, the /fw resource and the
/fw fast path follow, since all three ask only this.
"""

from __future__ import annotations

import dataclasses

from ..store import ImageRecord, Principal, ReleaseRecord, Role
from ..store.deltas import DeltaRecord
from .store_view import StoreView


def _served(
    view: StoreView, principal: Principal
) -> tuple[ReleaseRecord | None, DeltaRecord | None]:
    """(its release, the delta envelope of it this device is served instead, if any)."""
    if principal.role is not Role.DEVICE:
        return None, None
    device = view.device(principal.name)
    release = view.release_for(device) if device is not None else None
    if release is None or device is None:
        return None, None
    return release, view.delta_for(device, release)


def release_of(view: StoreView, principal: Principal) -> ReleaseRecord | None:
    """The release whose envelope `principal` is served on /m, if any.

    With a delta envelope for the image the device runs (store/deltas.py), that
    envelope is the one served: the record carries it (and its manifest digest)."""
    release, delta = _served(view, principal)
    if release is None or delta is None:
        return release
    return dataclasses.replace(
        release, envelope=delta.envelope, manifest_digest=delta.manifest_digest
    )


def readable_image(view: StoreView, principal: Principal) -> ImageRecord | None:
    """The image `principal` may read on /fw/<image id>, if any (ATTACKS.md #32: any
    other id is "not found", with no hint whether it exists): its release's image
    (component 0's of a multi-component release), or the patch when it is served a
    delta envelope (the /fw fast path grants this one)."""
    release, delta = _served(view, principal)
    if delta is not None:
        return delta.patch
    return release.image if release is not None else None


def fallback_image(view: StoreView, principal: Principal) -> ImageRecord | None:
    """When `principal` is served a delta envelope, its full-image fallback."""
    release, delta = _served(view, principal)
    return release.image if release is not None and delta is not None else None


def readable_images(view: StoreView, principal: Principal) -> tuple[ImageRecord, ...]:
    """Every image `principal` may read: readable_image (the one rule), a delta's
    full-image fallback, and each other component's image of a multi-component
    release (docs/decisions/multi-component.md; such a release has no deltas, as
    store/publish.py refuses them), and no other."""
    image = readable_image(view, principal)
    if image is None:
        return ()
    release, delta = _served(view, principal)
    if release is None:
        return (image,)
    if delta is not None:
        return (image, release.image)
    return (image, *release.more_images)


def image_named(view: StoreView, principal: Principal, image_id: str) -> ImageRecord | None:
    """The image with this id among those `principal` may read (readable_images), else None."""
    return next((i for i in readable_images(view, principal) if i.image_id == image_id), None)
