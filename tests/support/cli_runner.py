"""Running `tsbot` / `tsbot-tui` in-process, as a terminal would see it, for tests that try many inputs.

A subprocess costs a second of imports; this costs a function call. The environment is replaced (no TSBOT_
variable of the tester leaks in), the working directory is set, stdout is strict UTF-8 like a terminal's
(printing an undecodable file name must not pass here and fail there), stderr escapes like Python's, and
the logging handlers a command installs are removed afterwards so the next call starts clean.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

TRACEBACK_MARKERS = ("Traceback (most recent call last)", "internal error")


@dataclass(frozen=True, slots=True)
class CliResult:
    code: int
    stdout: str
    stderr: str
    argv: tuple[str, ...] = ()

    @property
    def stderr_lines(self) -> list[str]:
        return self.stderr.splitlines()

    @property
    def traceback(self) -> bool:
        """A traceback, or the one line that stands for a bug (its traceback went to the log)."""
        return any(marker in self.stdout + self.stderr for marker in TRACEBACK_MARKERS)

    def problems(self) -> list[str]:
        """What breaks the contract: an exit code outside {0, 1, 2} (`status` may also answer 3, the
        monitoring convention's unknown), a traceback, or a failure said in anything but exactly one line on
        stderr."""
        found = []
        allowed = (0, 1, 2, 3) if self.argv[:1] == ("status",) else (0, 1, 2)
        if self.code not in allowed:
            found.append(f"exit code {self.code}")
        if self.traceback:
            found.append("traceback")
        if self.code in (1, 2) and len(self.stderr_lines) != 1:
            found.append(f"{len(self.stderr_lines)} lines on stderr")
        return found


def run_in_process(
    main: Callable[[Sequence[str]], int],
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path,
) -> CliResult:
    saved_environ = dict(os.environ)
    saved_cwd = os.getcwd()
    saved_streams = sys.stdout, sys.stderr
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    for handler in saved_handlers:
        root.removeHandler(handler)
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", write_through=True)
    err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="backslashreplace", write_through=True)
    try:
        os.environ.clear()
        os.environ.update({k: v for k, v in saved_environ.items() if not k.startswith("TSBOT_")})
        os.environ.update(env or {})
        os.chdir(cwd)
        sys.stdout, sys.stderr = out, err
        try:
            code = main(list(argv))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # what the interpreter would print: the test sees it as a traceback
            err.write(traceback.format_exc())
            code = 1
    finally:
        sys.stdout, sys.stderr = saved_streams
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_environ)
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        for handler in saved_handlers:
            root.addHandler(handler)
        root.setLevel(saved_level)
    return CliResult(code, _text(out), _text(err), tuple(argv))


def _text(stream: io.TextIOWrapper) -> str:
    stream.flush()
    buffer = stream.buffer
    assert isinstance(buffer, io.BytesIO)
    return buffer.getvalue().decode("utf-8", "backslashreplace")
