"""What a fleet run needs, validated once (DESIGN principle 8), and how it refuses.

Limits and defaults live here so the CLI, the setup and the workers agree on them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from otacoap.cliargs import read_small_file

from ..netem import LinkProfile

DEFAULT_IMAGE_SIZE = 64 * 1024
DEFAULT_CONCURRENCY = 50
DEFAULT_TIMEOUT = 300.0
DEFAULT_ATTEMPTS = 3
DEFAULT_VENDOR = "fleet.otacoap.example"
SECTOR_SIZE = 4096
MAX_IMAGE_SIZE = 16 * 1024 * 1024  # the server's default publish.max_image_size
MAX_DEVICES = 100_000
DEFAULT_POLL_INTERVAL = 2.0  # campaign runs: seconds between a waiting device's polls
PSK_LENGTH = 16  # tinydtls carries at most 16-byte keys (otacoap.store.names)


class FleetError(ValueError):
    """A refusal with a one-line message.

    A ValueError on purpose: device_sim.cli.main already turns ValueError into one
    line on stderr, so the `fleet` subcommand behaves the same once registered there.
    """


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class FleetOptions:
    """Everything a run needs, validated once (DESIGN principle 8)."""

    server: str
    devices: int
    key_path: Path
    data: Path | None = None
    operator: str | None = None
    operator_psk: bytes | None = None
    devices_file: Path | None = None
    vendor_domain: str = DEFAULT_VENDOR
    class_info: str | None = None
    seq: int = 2
    image_size: int = DEFAULT_IMAGE_SIZE
    release: tuple[Path, Path] | None = None
    # Both directions of every device's link; all zero: no proxy in between.
    impairment: LinkProfile = field(default_factory=LinkProfile)
    concurrency: int = DEFAULT_CONCURRENCY
    processes: int = 1
    block_size: int = 1024
    # Block2 requests outstanding per device. Lock-step by default: with a hundred
    # devices in one process the simulator's own CPU, not the round trip, is the
    # limit, and a window then only adds spurious timeouts (bench/RESULTS.md).
    max_window: int = 1
    seed: int = 0
    timeout: float = DEFAULT_TIMEOUT
    max_time: float | None = None
    attempts: int = DEFAULT_ATTEMPTS
    work: Path | None = None
    report: Path | None = None
    plot: Path | None = None
    progress: bool | None = None  # None: when stderr is a TTY
    # --campaign: the parsed plan (otacoap.campaign_args.CampaignPlan, through
    # operator_role.parse_campaign); the release is then published with rollout none.
    campaign: Any = None
    campaign_text: str | None = None
    poll_interval: float = DEFAULT_POLL_INTERVAL
    bad_fraction: float = 0.0
    cleanup: bool = False
    # Encrypt the generated release (A128CTR, CEK wrapped under a class A128KW key the
    # devices are provisioned with; draft-ietf-suit-firmware-encryption).
    encrypt: bool = False
    # --delta: devices start on an OLD release (seq - 1) the server knows they run; the
    # release carries a delta from it (docs/decisions/delta-updates.md). `old_image`:
    # that image (None: generated); `delta_mismatch_fraction`: devices that run another
    # image at seq - 1, so the patch's source check fails and they take the full image.
    delta: bool = False
    old_image: Path | None = None
    delta_mismatch_fraction: float = 0.0

    def run_deadline(self) -> float:
        """The whole run's bound: every wave of devices using its full deadline."""
        if self.max_time is not None:
            return self.max_time
        waves = math.ceil(self.devices / max(1, self.concurrency))
        return waves * self.timeout + 60.0


def check_payload_modes(delta: bool, encrypt: bool, *, given_encrypted: bool = False) -> None:
    """The one place that says which payload modes combine.

    --delta with --encrypt is an encrypted delta (docs/decisions/delta-updates.md,
    "Encrypted deltas"): the patch encrypted under the class key, the encrypted release
    as fallback. A given --release that is already encrypted is refused: its devices
    need a key the fleet does not have (--encrypt makes the class key itself), and a
    delta of it would need the patch encrypted for that release's recipients.
    """
    if given_encrypted:
        raise FleetError(
            "--release is encrypted: the fleet holds no key of its recipients to "
            "provision the devices with"
            + (" or to encrypt the patch" if delta else "")
            + "; use --encrypt with a generated release"
        )


def read_input(path: Path, cap: int, what: str) -> bytes:
    """Read a small input file (`what` names its option), refusing with one line."""
    try:
        return read_small_file(path, cap)
    except ValueError as exc:
        raise FleetError(f"{what} {exc}") from None
