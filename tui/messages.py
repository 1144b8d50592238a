"""Messages the app's workers post; each has one handler on the app that updates widgets."""

from __future__ import annotations

from textual.message import Message
from textual.notifications import SeverityLevel

from engine.code_watch import CodeDifference
from engine.engine import StartupReport
from storage.lease import LeaseHolder
from tui.feed import LogEntry


class FeedStarted(Message):
    def __init__(self, report: StartupReport | None):
        super().__init__()
        self.report = report


class FeedRefused(Message):
    """Another engine holds the account lease."""

    def __init__(self, message: str, holder: LeaseHolder | None):
        super().__init__()
        self.message = message
        self.holder = holder


class FeedFailed(Message):
    def __init__(self, error: str):
        super().__init__()
        self.error = error


class LogEntryAdded(Message):
    def __init__(self, entry: LogEntry):
        super().__init__()
        self.entry = entry


class RepaintRequested(Message):
    """Something the operator should see at once (entries toggled, engine state): repaint now rather than at
    the next frame. Any number of them pending collapse into one."""

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, RepaintRequested)


class CodeChanged(Message):
    def __init__(self, difference: CodeDifference | None):
        super().__init__()
        self.difference = difference

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, CodeChanged)


class CommandDone(Message):
    """A one-shot operator command (entries, close) finished: what to tell the operator."""

    def __init__(self, text: str, *, severity: SeverityLevel = "information"):
        super().__init__()
        self.text = text
        self.severity = severity
