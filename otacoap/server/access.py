"""Who is served what: the one authorisation rule of /m and /fw.

A principal comes from the DTLS session (StoreView.principal_of). A device is served
its release and may read that release's image and no other; an operator is served
neither. Which release: a pinned one (`release assign`), else the newer of its class's
current release and the one a rollout campaign admitted it to (`store.campaigns.
served_release`, through the view's caches). So a device outside a campaign's open
waves, or not admitted yet (window, --max-downloads), keeps what it had: it is "not
yet" told anything new, over its existing session, and its /m observation is notified
when it is admitted. The /m resource, the /fw resource and the /fw fast path follow,
since all three ask only this.
"""

from __future__ import annotations

from ..store import ImageRecord, Principal, ReleaseRecord, Role
from .store_view import StoreView


def release_of(view: StoreView, principal: Principal) -> ReleaseRecord | None:
    """The release whose envelope `principal` is served on /m, if any."""
    if principal.role is not Role.DEVICE:
        return None
    device = view.device(principal.name)
    return view.release_for(device) if device is not None else None


def readable_image(view: StoreView, principal: Principal) -> ImageRecord | None:
    """The image (component 0's) `principal` may read on /fw/<image id>, if any
    (ATTACKS.md #32: any other id is "not found", with no hint whether it exists)."""
    release = release_of(view, principal)
    return release.image if release is not None else None


def readable_images(view: StoreView, principal: Principal) -> tuple[ImageRecord, ...]:
    """Every image `principal` may read: its release's, each component's of a
    multi-component release (docs/decisions/multi-component.md), and no other."""
    image = readable_image(view, principal)  # the one rule; the others go with it
    if image is None:
        return ()
    release = release_of(view, principal)
    more = release.more_images if release is not None and release.image == image else ()
    return (image, *more)
