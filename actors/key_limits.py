"""Client key limits shared by every edge process of the gateway, hosted by the Metrics
actor: several edge workers (SLUICE_WORKERS > 1) and several hosts (docs/scale-out.md).

With one edge process, edge/api_keys.py counts each key's usage in that process. With N
edge processes each would count only its own share and a key would get N times its rpm,
tpm and concurrency, so the counting moves here, to one place for the whole cluster (the
leader's Metrics): an edge that has authenticated a key asks `KeyAdmit` (one ask per
request of a keyed client: the price of exactness, measured in docs/benchmarks.md) and
reports the request's end as a `key_finish` record in its usual record batch
(`KeyLimits.finish`). The ask carries the key's entry from the asking edge's own keys
file (`KeyAdmit.key`: limits and models, never the hash), so this actor reads no file:
every host may serve every key its own file holds, and the verdict is the one-process
verdict of the same code (`ApiKeys`), counted over every edge. The last entry asked with
is the one in force (give every host the same file: docs/security.md).

Every open request belongs to the edge that was admitted it (`open_by`); when run.py
reports an edge worker dead (`MemberLost(edge, edge_id)`), what it held is finished at
once with the outcome `edge_lost`, so its streams stop counting against the key's
concurrency.

The per-key counters for /metrics (`sluice_key_*`) are rendered here, over all edges that
count here; the edges send their authentication failures as `key_auth_failure` records.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

from edge.api_keys import ApiKeys, ClientKey, Denial, KeysFileError

FINISH = "key_finish"  # {"kind", "key_id", "outcome", "tokens", "edge_id"}
AUTH_FAILURE = "key_auth_failure"  # {"kind", "reason": "missing" | "invalid"}
KINDS = (FINISH, AUTH_FAILURE)
UNAVAILABLE = "key_limits_unavailable"


class KeyLimits:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.keys = ApiKeys(None, clock, counting=True)
        self.open_by: Counter = Counter()  # (edge_id, key_id) -> requests admitted, not yet finished

    def admit(self, key_id: str, provider: str, model: str, edge_id: str, entry: dict | None) -> dict | None:
        """`entry`: the key as the asking edge's file has it (`ClientKey.to_wire`)."""
        try:
            self.keys.learn(ClientKey.from_wire(key_id, entry))
        except KeysFileError as exc:  # an edge that sent no entry (an older one) or a bad one
            return _as_dict(Denial(503, "api_error", UNAVAILABLE, f"the gateway cannot check this key now: {exc}", 1.0))
        denial = self.keys.admit(key_id, provider, model)
        if denial is None:
            self.open_by[(edge_id, key_id)] += 1
            return None
        return _as_dict(denial)

    def ingest(self, record: dict) -> None:
        """A `key_finish` or `key_auth_failure` record from an edge (malformed ones ignored)."""
        if record.get("kind") == AUTH_FAILURE and record.get("reason") in self.keys.failures:
            self.keys.failures[record["reason"]] += 1
        elif record.get("kind") == FINISH:
            held = (record.get("edge_id"), record.get("key_id"))
            tokens = record.get("tokens")
            if self.open_by[held] <= 0 or not isinstance(tokens, int) or not isinstance(record.get("outcome"), str):
                self.open_by.pop(held, None)
                return
            self.open_by[held] -= 1
            self.keys.finish(record["key_id"], record["outcome"], tokens)

    def edge_lost(self, edge_id: str) -> int:
        """Finish whatever the dead edge held; how many requests that was."""
        released = 0
        for held in [h for h in self.open_by if h[0] == edge_id]:
            for _ in range(self.open_by.pop(held)):
                self.keys.finish(held[1], "edge_lost", 0)
                released += 1
        return released

    def prometheus(self) -> str:
        """Nothing until some edge counts here (a gateway whose one edge counts its own keys
        renders them there, edge/app.py)."""
        if not self.keys.usage and not any(self.keys.failures.values()):
            return ""
        return self.keys.prometheus().replace(" (this edge)", "").replace(" on this edge", "")

    def state(self) -> dict:
        return self.keys.state()


def _as_dict(denial: Denial) -> dict:
    return {
        "status": denial.status,
        "type": denial.type,
        "code": denial.code,
        "message": denial.message,
        "retry_after_s": denial.retry_after_s,
    }
