"""What an actor's logic asks its host to do: pure values, no Thespian.

Every logic class has `handle(message, sender, now) -> list[Send | After]`. The Thespian
host (actors/host.py) carries the effects out for real; the simulation harness
(sim/harness.py) carries them out on a virtual clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Send:
    """Send `msg` to `to`: a role name from the directory ("pacer:openai", "pool", ...)
    or a sender handle that `handle` was given (to reply)."""

    to: Any
    msg: Any


@dataclass(frozen=True, slots=True)
class After:
    """Deliver `msg` back to this same logic after `delay_s` seconds (a timer)."""

    delay_s: float
    msg: Any
