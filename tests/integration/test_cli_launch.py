"""A signal in the second `tsbot` and `tsbot-tui` spend importing their modules (`engine.launch`): a Ctrl-C
there printed a KeyboardInterrupt traceback, and a SIGTERM or SIGHUP ended the process without a word
(exit 143, an operator's drill). Now it is one line, and the process then dies by the signal.

The signal is sent once the launcher's handlers are in place (the kernel lists SIGTERM as caught in
/proc/<pid>/status: nothing else in the program catches it before its imports are done), so it lands while
the program is still being imported."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def _catches(pid: int, signum: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) & (1 << (signum - 1)))


def _environment(home: Path) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TSBOT")} | {"HOME": str(home)}


def _until_importing(process: subprocess.Popen[str] | subprocess.Popen[bytes], program: str) -> None:
    """Until the launcher's handlers are in place (SIGINT, SIGTERM and SIGHUP caught): the program is being
    imported. (Waiting for SIGTERM alone, a SIGHUP sent under load fell between the two installations and
    ended the process by its default action, without a word: a race of the test's, not the launcher's.)"""
    deadline = time.monotonic() + 30
    while not all(_catches(process.pid, s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)):
        assert process.poll() is None, f"{program} ended before its launcher caught its signals"
        assert time.monotonic() < deadline, f"{program} never caught its signals while starting"
        time.sleep(0.001)


@pytest.mark.parametrize("program", ["tsbot", "tsbot-tui"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_signal_while_the_program_is_imported_is_one_line_and_its_exit_code(
    program: str, signum: signal.Signals, tmp_path: Path
) -> None:
    process = subprocess.Popen(
        [str(BIN / program), "--version"],
        cwd=tmp_path,
        env=_environment(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _until_importing(process, program)
        process.send_signal(signum)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert err.splitlines() == [f"{program}: stopped by {signum.name} while starting; nothing was done"], (
        f"stdout {out!r}, stderr {err!r}"
    )
    assert out == ""
    # Dead by the signal itself (a supervisor counts that a clean stop; exit 143 a failure): a shell reads
    # 128 + its number.
    assert process.returncode == -signum


def test_a_signal_while_starting_with_stderr_gone_still_ends_the_process_by_it(tmp_path: Path) -> None:
    """Its line cannot be written (a closed terminal, SIGHUP's usual cause; a log pipe gone): the process
    still dies by the signal, where the failed write made it exit 1 (a reviewer)."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody reads: a write gets EPIPE
    try:
        process = subprocess.Popen(
            [str(BIN / "tsbot"), "--version"],
            cwd=tmp_path,
            env=_environment(tmp_path),
            stdout=subprocess.DEVNULL,
            stderr=write_end,
        )
    finally:
        os.close(write_end)
    try:
        _until_importing(process, "tsbot")
        process.send_signal(signal.SIGHUP)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGHUP
