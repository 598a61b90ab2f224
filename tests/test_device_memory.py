"""The agent holds a block or two, whatever the image size (ATTACKS.md O4, #12).

tracemalloc peak of one whole update (check, download, stage, reboot, trial boot,
confirm, reports) must stay under 2 x block size + 64 KiB and must not grow with the
image: 1 MiB over real DTLS, 1 MiB and 16 MiB through the in-process transport. How it
is measured, and why that way, is in memory_probe.py (shared with the bench).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from memory_probe import dtls_update_peak, inprocess_update_peak

from device_sim.agent import Outcome

BLOCK = 1024
BOUND = 2 * BLOCK + 64 * 1024


def _inprocess_peak(tmp: Path, size: int) -> int:
    m = inprocess_update_peak(tmp, size)
    assert m.result.outcome == Outcome.UPDATED, m.result
    assert m.rig.boots()[1] == m.image_digest
    return m.peak


@pytest.mark.slow
def test_memory_does_not_grow_with_the_image_in_process(tmp_path: Path) -> None:
    small = _inprocess_peak(tmp_path / "a", 1 << 20)
    large = _inprocess_peak(tmp_path / "b", 16 << 20)
    print(f"\nin-process tracemalloc peak: 1 MiB {small} B, 16 MiB {large} B (bound {BOUND} B)")
    assert small < BOUND and large < BOUND
    assert large - small < 8 * 1024, "peak must not grow with the image size"


@pytest.mark.network
@pytest.mark.timeout(120)
def test_memory_over_dtls_1mib(tmp_path: Path) -> None:
    m = dtls_update_peak(tmp_path, 1 << 20)
    peak, result = m.peak, m.result
    print(f"\nDTLS 1 MiB tracemalloc peak: {peak} B (bound {BOUND} B)")
    assert result.outcome == Outcome.UPDATED, result
    assert m.rig.boots()[1] == m.image_digest
    assert peak < BOUND
