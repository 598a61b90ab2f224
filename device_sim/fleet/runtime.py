"""What every fleet process sets up: quiet logs, SIGTERM as Ctrl-C (the event loop is
otacoap.eventloop's, as for every entry point)."""

from __future__ import annotations

import logging
import signal
import threading
import warnings
from typing import Any


def sigterm_cleans_up() -> None:
    """SIGTERM (a CI runner, a parent giving up) unwinds like Ctrl-C: proxies and agents
    are closed and the temporary flash directory is removed instead of left behind."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def quiet_aiocoap(verbose: int) -> None:
    """Log levels for a run of thousands of devices; `verbose` is the CLI's -v count."""
    # aiocoap's tinydtls client warns on every context shutdown that races a last write.
    warnings.filterwarnings("ignore", message="DTLS module did not shut down", category=UserWarning)
    # A lossy link makes aiocoap log every retransmission and late answer at warning
    # level; thousands of devices would flood the terminal. -vv shows them again.
    if verbose < 2:
        logging.getLogger("coap").setLevel(logging.ERROR)
        logging.getLogger("coap-server").setLevel(logging.ERROR)
        for name in (
            "device_sim.agent",
            "device_sim.coap",
            "device_sim.fetcher",
            "device_sim.netem",
        ):
            logging.getLogger(name).setLevel(logging.WARNING if verbose else logging.ERROR)
