"""The console scripts' first code: `tsbot` and `tsbot-tui` import a second of modules before their own
signal handling exists. A Ctrl-C in that second printed a KeyboardInterrupt traceback, and a SIGTERM or
SIGHUP (a supervisor's stop, a closed terminal) ended the process with no word at all. Here the signals
are caught while the program is imported: the process says in one line that it stopped before it started,
and then dies by that signal, as it would have without us (a shell reads 128 + its number). Nothing of
ours has run by then: nothing is lost.

This module imports nothing heavy, so that its handlers are in place a few milliseconds after start."""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any, NoReturn

# (SIGHUP: where the platform has it.)
_CAUGHT = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class _StoppedWhileStarting(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop(signum: int, frame: FrameType | None) -> None:
    raise _StoppedWhileStarting(signum)


def _load_main(module: str, program: str) -> Callable[[], int]:
    """`module`'s main, imported with the signals caught; a signal meanwhile ends the process here."""
    previous: dict[int, Any] = {}
    try:
        try:
            for signum in _CAUGHT:  # (inside the try: one caught before the next is set is handled too)
                previous[signum] = signal.signal(signum, _stop)
            return importlib.import_module(module).main
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    except _StoppedWhileStarting as stopped:
        name = signal.Signals(stopped.signum).name
        # (A terminal gone, SIGHUP's usual cause, or a log pipe closed: no line, but the same end.)
        with contextlib.suppress(OSError):
            print(
                f"{program}: stopped by {name} while starting; nothing was done", file=sys.stderr, flush=True
            )
        _die_by(stopped.signum)
        raise  # (not reached)


def _die_by(signum: int) -> NoReturn:
    """End the process by the signal itself, as it would have without us: a supervisor (systemd) counts a
    death by SIGTERM as a clean stop, and exit status 143 as a failure (a reviewer)."""
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    raise SystemExit(128 + signum)  # a platform where the signal does not end the process


def tsbot() -> int:
    return _load_main("engine.cli", "tsbot")()


def tsbot_tui() -> int:
    return _load_main("tui.app", "tsbot-tui")()
