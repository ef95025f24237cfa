"""SIGTERM/SIGUSR1 (SLURM's preemption and time-limit warnings) ask a run to stop cleanly.

The handlers are installed first thing (by the CLI, before the heavy imports, and again by the
trainer), so a signal during start-up (imports, model load, engine start) is honoured like
one mid-run instead of killing the process with -15. Standard library only: importing this
module must be instant.
"""

from __future__ import annotations

import logging
import signal

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_requested = False
_previous: dict = {}


def _handle(signum, frame):
    global _requested
    _requested = True
    log.warning("received signal %d: stopping cleanly at the next step boundary", signum)


def install() -> None:
    for sig in SIGNALS:
        if sig in _previous:
            continue
        try:
            _previous[sig] = signal.signal(sig, _handle)
        except ValueError:  # not the main thread (e.g. under some test runners): no handler
            pass


def requested() -> bool:
    return _requested


def restore() -> None:
    global _requested
    for sig, handler in _previous.items():
        signal.signal(sig, handler)
    _previous.clear()
    _requested = False
