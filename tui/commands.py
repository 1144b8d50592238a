"""The command palette's dashboard commands, from the same registry as the footer and the help screen."""

from __future__ import annotations

from functools import partial

from rich.text import Text
from textual.command import DiscoveryHit, Hit, Hits, Provider

from tui import keys


class DashboardCommands(Provider):
    def _entries(self) -> list[tuple[str, str, str]]:
        keymap = getattr(self.app, "active_keymap", {})
        entries = [
            (
                f"{command.title}  ({keys.key_for(command, keymap, self.app)})",
                command.action,
                command.description,
            )
            for command in keys.COMMANDS
        ]
        entries.extend(keys.PALETTE_ONLY)
        return entries

    async def discover(self) -> Hits:
        for name, action, description in self._entries():
            yield DiscoveryHit(Text(name), partial(self.app.run_action, action), help=description)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, action, description in self._entries():
            score = matcher.match(name)
            if score > 0:
                yield Hit(
                    score, matcher.highlight(name), partial(self.app.run_action, action), help=description
                )
