"""Stopping a command from outside: Ctrl-C (SIGINT) and SIGTERM, which `kill`, `docker stop`, systemd, SLURM time
limits and torchrun (passing on its own SIGTERM to every rank) send.

SIGTERM is treated like Ctrl-C. Outside the training loop it raises `Terminated` (a KeyboardInterrupt, as Ctrl-C
raises one), so the same clean-up runs and the command ends with one line and exit status 143 (128 + 15, the
shell's convention for SIGTERM; Ctrl-C keeps 130). Inside the training loop `StopRequests` lets the step finish
and a checkpoint be written first (see train.py). Python's default for SIGTERM is to die on the spot, with no
checkpoint and temporary files left behind.
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager


class Terminated(KeyboardInterrupt):
    """SIGTERM stopped the command (exit status 143)."""


def _in_main_thread() -> bool:
    # Python runs signal handlers in the main thread only, and only it may install them.
    return threading.current_thread() is threading.main_thread()


def _raise_terminated(signum, frame):
    raise Terminated


@contextmanager
def sigterm_as_interrupt():
    """Within the block SIGTERM raises `Terminated`; the handler in place before comes back afterwards."""
    if not _in_main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class StopRequests:
    """The first Ctrl-C or SIGTERM lets the current step finish (so the checkpoint is exact); a second one stops
    at once. `stop()` raises what the first asked for: KeyboardInterrupt, or Terminated for SIGTERM."""

    _NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def pressed(self) -> bool:
        return self.signum is not None

    def __enter__(self):
        if _in_main_thread():
            for signum in self._NAMES:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.pressed:
            raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        self.signum = signum
        again = "Ctrl-C again" if signum == signal.SIGINT else "SIGTERM again"
        prefix = "" if signum == signal.SIGINT else "SIGTERM: "
        print(f"\ndoratweet: {prefix}finishing this step, then saving a checkpoint ({again} to stop now)",
              file=sys.stderr)

    def stop(self):
        raise Terminated if self.signum == signal.SIGTERM else KeyboardInterrupt

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
