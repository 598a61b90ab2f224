"""A delta envelope's publish verifies its signature once too (issue 9 §1, done when:
"the signature of an envelope is verified once per publish").

`publish_file_any` authenticates an envelope once and tells a release from a delta by
the authentic manifest; the delta's checks (`DeltaPublisher`) then only admit. Counting
calls to the one verify function, as tests/test_publish_verifies_once.py does for a
release, shows that a release published with its delta costs one verification each.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from delta_rig import synthetic_pair
from server_helpers import CLASS_A, VENDOR, DeviceSpec, cli_ok, make_setup

from otacoap.core import cose
from otacoap.fsutil import atomic_write


def test_a_release_and_its_delta_are_verified_once_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = make_setup(tmp_path, devices=[DeviceSpec("dev-1")])
    cli_ok("keygen", "--out", tmp_path / "author")
    cli_ok("trust", "add", "--data", setup.data, tmp_path / "author.pub")
    old, new = synthetic_pair(20_000)
    old_bin, new_bin = tmp_path / "old.bin", tmp_path / "new.bin"
    atomic_write(old_bin, old)
    atomic_write(new_bin, new)

    def build(seq: int, out: str, *extra: str | Path) -> Path:
        cli_ok(
            "manifest", "build", "--image", new_bin if seq == 2 else old_bin,
            "--vendor-domain", VENDOR, "--class-info", CLASS_A, "--seq", str(seq),
            "--key", tmp_path / "author", "-o", tmp_path / out, *extra,
        )  # fmt: skip
        return tmp_path / out

    cli_ok("publish", "--data", setup.data, build(1, "v1.suit"), old_bin)
    full = build(2, "v2.suit")
    delta_env = build(2, "v2-from-v1.suit", "--delta-from", old_bin)

    calls: list[int] = []
    real: Callable[..., cose.TrustAnchor] = cose.verify_block

    def counting(*args: Any, **kwargs: Any) -> cose.TrustAnchor:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cose, "verify_block", counting)
    out = cli_ok(
        "publish", "--data", setup.data, full, new_bin,
        "--delta", delta_env, Path(f"{delta_env}.patch"),
    )  # fmt: skip
    assert "delta from" in out
    assert len(calls) == 2, "one verification for the release, one for its delta"
