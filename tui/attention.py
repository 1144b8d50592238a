"""On CRITICAL the terminal asks for attention, for an operator whose eyes are on another window: the bell
once per episode, and the window title says CRITICAL (OSC 2, which tmux shows as the pane title and passes
to the outer terminal with `set-titles on`; inside tmux the window name too, where `allow-rename` is on).
On recovery the title is put back: the one saved on the terminal's title stack where it keeps one, else
plain "tsbot".

Pure: `update()` returns the escape sequence to write (the app writes it to its terminal).
"""

from __future__ import annotations

from dataclasses import dataclass

from protection.health import ComponentHealth, HealthState, worst_state

BELL = "\a"
SAVE_TITLE = "\x1b[22;2t"  # xterm: push the window title on the title stack
RESTORE_TITLE = "\x1b[23;2t"  # xterm: pop it back
NORMAL_TITLE = "tsbot"


def set_title(text: str, *, in_tmux: bool) -> str:
    text = "".join(ch for ch in text if ch.isprintable())[:80]
    sequence = f"\x1b]2;{text}\x1b\\"  # ended by ST, not BEL: a BEL here is the bell's character
    return sequence + (f"\x1bk{text}\x1b\\" if in_tmux else "")


def critical_title(components: tuple[ComponentHealth, ...], source: str) -> str:
    critical = [c for c in components if c.state is HealthState.CRITICAL]
    reason = critical[0].reason if critical else ""
    return f"CRITICAL {NORMAL_TITLE} {source}" + (f": {reason}" if reason else "")


@dataclass
class CriticalAttention:
    in_tmux: bool = False
    critical: bool = False
    episodes: int = 0  # CRITICAL episodes seen: the bell rang once for each

    def update(self, components: tuple[ComponentHealth, ...], source: str) -> str:
        """What to write to the terminal after this health reading ("" when nothing changes)."""
        now_critical = bool(components) and worst_state(c.state for c in components) is HealthState.CRITICAL
        if now_critical == self.critical:
            return ""
        self.critical = now_critical
        if now_critical:
            self.episodes += 1
            return BELL + SAVE_TITLE + set_title(critical_title(components, source), in_tmux=self.in_tmux)
        return self.restore()

    def restore(self) -> str:
        """The title as it was (where the terminal kept it), else plain "tsbot"."""
        self.critical = False
        return set_title(NORMAL_TITLE, in_tmux=self.in_tmux) + RESTORE_TITLE
