"""Ctrl-C and SIGTERM mean the same to every command: stop, clean up, say so in one line.

`signals_interrupt()` turns SIGINT and SIGTERM into an `Interrupted` exception raised wherever the
command is, so the `except`/`finally` clauses that remove temporary files run as for any error; a
second signal while cleaning up ends the process at once. `Interrupted` derives from BaseException
(as KeyboardInterrupt does) so that no `except Exception` swallows it, but it is not a
KeyboardInterrupt, which the CLI framework would turn into a silent exit 130.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """The user (Ctrl-C) or the system (SIGTERM) asked the command to stop; the message, if any, says
    what was kept."""


def _raise_interrupted(signum, frame):
    for number in SIGNALS:  # a second signal kills; the next write removes what it leaves
        signal.signal(number, signal.SIG_DFL)
    raise Interrupted()


@contextmanager
def signals_interrupt() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise Interrupted; the previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, _raise_interrupted) for number in SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
