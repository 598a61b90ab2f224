"""Who is served what: the one authorisation rule of /m and /fw.

A principal comes from the DTLS session (StoreView.principal_of). Today a device is
served its release (pinned, else its class's current one) and may read that release's
image and no other; an operator is served neither. Campaigns will change who gets
which release and which images a device may read: change it here, and the /m
resource, the /fw resource and the /fw fast path follow, since all three ask only this.
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
    """The one image `principal` may read on /fw/<image id>, if any (ATTACKS.md #32:
    any other id is "not found", with no hint whether it exists)."""
    release = release_of(view, principal)
    return release.image if release is not None else None
