"""The README's operator walkthrough, run as written (issue 12 §2 "Done when").

The blocks fenced ```` ```sh walkthrough ```` are terminal 1, run in order by one bash
(so `source` and `cd` carry over, as in a terminal); the ```` ```sh walkthrough-serve ````
block is terminal 2, started once the first block is done. Only the ports change (5684
and 9464 become free ones, so a busy machine cannot make this fail), and the test adds
the waits a person does by eye: terminal 1 goes on when terminal 2 says "listening on".
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from server_helpers import ROOT

pytestmark = [pytest.mark.network, pytest.mark.timeout(600)]

FENCE = re.compile(r"^```sh (walkthrough(?:-serve)?)\n(.*?)^```$", re.M | re.S)


def _blocks() -> list[tuple[str, str]]:
    blocks = [(m.group(1), m.group(2)) for m in FENCE.finditer((ROOT / "README.md").read_text())]
    assert [kind for kind, _ in blocks].count("walkthrough-serve") == 1, blocks
    assert blocks[0][0] == "walkthrough" and len(blocks) >= 3
    return blocks


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_operator_walkthrough_runs_as_written(tmp_path: Path) -> None:
    blocks = _blocks()
    dtls, metrics = _free_port(socket.SOCK_DGRAM), _free_port(socket.SOCK_STREAM)

    def ported(text: str) -> str:
        return text.replace("5684", str(dtls)).replace("9464", str(metrics))

    # The README runs from the repository root, where `.venv` is: this test runs in a
    # scratch directory that has the same `.venv`.
    if sys.prefix == sys.base_prefix:
        pytest.skip("the README's walkthrough activates .venv: run the tests from one")
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("VIRTUAL_ENV", None)
    first = blocks.index(next(b for b in blocks if b[0] == "walkthrough-serve"))
    go_on = tmp_path / "terminal-2-is-listening"
    script = ["set -euo pipefail"]
    for i, (kind, text) in enumerate(blocks):
        if kind == "walkthrough":
            script.append(ported(text))
        if i == first - 1:
            script.append(f'touch "{tmp_path}/terminal-1-set-up"')
            script.append(f'while [ ! -e "{go_on}" ]; do sleep 0.1; done')
    terminal1 = subprocess.Popen(
        ["bash", "-c", "\n".join(script)], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    serve: subprocess.Popen[str] | None = None
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "terminal-1-set-up").exists():
            assert terminal1.poll() is None, terminal1.communicate()[0]
            assert time.monotonic() < deadline, "terminal 1's set-up took too long"
            time.sleep(0.1)
        serve = subprocess.Popen(
            ["bash", "-c", "set -euo pipefail\n" + ported(blocks[first][1])],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True,
        )  # fmt: skip
        assert serve.stdout is not None
        served: list[str] = []
        while not any("metrics on" in line for line in served):  # after "listening on"
            line = serve.stdout.readline()
            assert line, "the server stopped: " + "".join(served)
            served.append(line)
        assert any(f"metrics on http://127.0.0.1:{metrics}" in line for line in served), served
        go_on.touch()
        out, _ = terminal1.communicate(timeout=400)
        assert terminal1.returncode == 0, out
    finally:
        if terminal1.poll() is None:
            terminal1.kill()
        if serve is not None and serve.poll() is None:
            os.killpg(serve.pid, signal.SIGINT)  # Ctrl-C in terminal 2
            serve.wait(timeout=20)
    print(out)  # shown when an assertion below fails
    assert "Traceback" not in out
    # What the walkthrough says happens, happened.
    assert re.search(r"campaign 1 .*finished", out), out
    assert "thermostat-000" in out and "the update did not stick" in out
    assert "halted" in out and "failure threshold" in out
    assert re.search(r'otacoap_campaign_members\{campaign="2"', out), out
    assert "audit log OK" in out
    assert out.count("4 devices in 1 class\n") == 2  # `status`, twice
    data = tmp_path / "walkthrough"
    assert (data / "audit.checkpoint").is_file()
