"""Binance TRAILING_STOP_MARKET semantics as a pure value: the venue-side model, not our protection logic.

A SELL trailing stop (protecting a long) arms when the mark reaches the activation price, then tracks the
highest mark since and triggers when the mark falls to highest × (1 − callback / 100). A BUY (protecting a
short) mirrors it: arms when the mark falls to the activation price, tracks the lowest mark, triggers when
the mark rises to lowest × (1 + callback / 100). The arming mark itself is the first extreme.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from decimal import Decimal

from engine.exchange.port import OrderSide

_HUNDRED = Decimal(100)


@dataclass(frozen=True, slots=True)
class TrailingStopState:
    side: OrderSide
    callback_rate: Decimal  # percent
    activation_price: Decimal
    armed: bool = False
    extreme: Decimal | None = None  # highest (SELL) or lowest (BUY) mark since arming

    def observe(self, mark: Decimal) -> TrailingStopState:
        """The state after seeing `mark` (arming and extreme tracking; triggering is `triggers_at`)."""
        if not self.armed:
            reached = (
                mark >= self.activation_price
                if self.side is OrderSide.SELL
                else mark <= self.activation_price
            )
            return replace(self, armed=True, extreme=mark) if reached else self
        assert self.extreme is not None
        if self.side is OrderSide.SELL and mark > self.extreme:
            return replace(self, extreme=mark)
        if self.side is OrderSide.BUY and mark < self.extreme:
            return replace(self, extreme=mark)
        return self

    @property
    def trigger_level(self) -> Decimal | None:
        """The mark at which the armed stop fires; None while not armed."""
        if not self.armed or self.extreme is None:
            return None
        if self.side is OrderSide.SELL:
            return self.extreme * (1 - self.callback_rate / _HUNDRED)
        return self.extreme * (1 + self.callback_rate / _HUNDRED)

    def triggers_at(self, mark: Decimal) -> bool:
        """True when this (already updated) state fires at `mark`."""
        level = self.trigger_level
        if level is None:
            return False
        return mark <= level if self.side is OrderSide.SELL else mark >= level
