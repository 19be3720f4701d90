"""What the edge measures of one client's request, how the request ended, and the request
record that says both: plain code, the clock passed in, so that every front end
(edge/admission.py, edge/app.py) and the simulator's edge (sim/harness.py `SimEdge`) measure
and record alike.

- `Measures`: one client's measurements (issue 18). Its TTFT is the client's: from the
  request's arrival at this edge (`received_at`) until the edge hands the first byte to its
  front end (`started(event, now)` is called as the `started` event is rendered), on the
  edge's clock; a follower that joined after the first byte waits for the replay only. For a
  leader, the provider's share of it (the Pool's `provider_ttft_ms`, on the Pool's clock).
  Also the queue wait, the upstream attempts, who answered (`served`) and how the stream
  ended (`ending`: usage, finish reason).
- `outcome_of(terminal event)`: the outcome and error code a stream's terminal event means;
  `DISCONNECTED` when the client left first; `rejected(...)` when admission refused it.
- `request_record(...)`: the one `kind: request` record per request, for Metrics.
"""

from __future__ import annotations

from protocols import events as ev

DISCONNECTED = {"outcome": "cancelled", "error_code": "disconnected"}
SERVED = ("provider", "model", "key", "fallback_from")  # who answered, from the Pool's started event


def outcome_of(event: dict) -> dict:
    """A terminal event's outcome: done, cancelled (the client's own cancel), or error."""
    if event["type"] == ev.DONE:
        return {"outcome": "done", "error_code": None}
    code = event.get("code")
    return {"outcome": "cancelled" if code == "cancelled" else "error", "error_code": code}


def rejected(code: str, provider: str, model: str) -> dict:
    """The outcome of a request that admission refused (the Coalescer's or the Pacer's 429)."""
    return {"outcome": "rejected", "error_code": code, "provider": provider, "model": model}


class Measures:
    """One client's measurements, from its arrival (`received_at`, the edge's clock)."""

    def __init__(self, received_at: float):
        self.received_at = received_at
        self.ttft_ms: float | None = None
        self.first_byte_at: float | None = None  # when this edge wrote the first byte (edge clock)
        self.queue_wait_ms: float | None = None
        self.provider_ttft_ms: float | None = None  # the leader's only: its call's provider TTFT
        self.attempts: int | None = None  # upstream calls it took (retries before the first byte)
        self.served: dict = {}  # who answered: provider, model, key, fallback_from (from the Pool)
        self.ending: dict = {}  # the terminal event's usage / finish reason

    def started(self, event: dict, now: float, leader: bool) -> None:
        """The stream's `started` event reaches the client at `now`. A resumed client's
        replay of it changes nothing: measured the first time."""
        if self.first_byte_at is not None:
            return
        self.first_byte_at = now
        self.ttft_ms = round((now - self.received_at) * 1000.0, 3)
        self.queue_wait_ms = event.get("queue_wait_ms")
        if leader:  # a follower did not wait for the provider's whole TTFT
            self.provider_ttft_ms = event.get("provider_ttft_ms")
        self.attempts = event.get("attempts")
        self.served = {k: event[k] for k in SERVED if event.get(k)}

    def terminal(self, event: dict) -> dict:
        """The stream's terminal event reaches the client: -> its outcome (`outcome_of`)."""
        self.ending = {k: event[k] for k in ("usage", "finish_reason") if event.get(k) is not None}
        return outcome_of(event)

    def ended(self, outcome: dict, provider: str, model: str) -> dict:
        """`outcome` with this client's measurements, as recorded and logged; `provider` and
        `model` are the requested ones, replaced by who answered (a fallback's labels)."""
        return {
            **outcome,
            "ttft_ms": self.ttft_ms,
            "queue_wait_ms": self.queue_wait_ms,
            "provider_ttft_ms": self.provider_ttft_ms,
            "provider": self.served.get("provider", provider),
            "model": self.served.get("model", model),
        }


def request_record(
    request_id: str, role: str, received_at: float, outcome: dict, now: float, key_id: str | None = None
) -> dict:
    """The request's one record for Metrics (actors/metrics_logic.py reads it): `outcome` is
    `Measures.ended(...)`, `rejected(...)` or `outcome_of(...)`'s, `now` the request's end."""
    return {
        "kind": "request",
        "request_id": request_id,
        "role": role,
        "outcome": outcome["outcome"],
        "error_code": outcome.get("error_code"),
        "ttft_ms": outcome.get("ttft_ms"),
        "queue_wait_ms": outcome.get("queue_wait_ms"),
        "latency_ms": (now - received_at) * 1000.0,
        "at": now,
        "key_id": key_id,
        # labels and the provider's share of the TTFT (actors/metrics_logic.py)
        "provider": outcome.get("provider"),
        "model": outcome.get("model"),
        "provider_ttft_ms": outcome.get("provider_ttft_ms"),
    }
