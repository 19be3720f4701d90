"""The Pacer actor: hosts PacerLogic for one provider account (role "pacer:<account>"),
every API key of the account included (one bucket and circuit per key, inside the logic)."""

from __future__ import annotations

import time

from actors import secret
from actors.circuit import CircuitSettings
from actors.host import HostActor, my_address
from actors.pacer_logic import PacerLogic, PoolAt
from protocols import messages as m
from protocols import roles
from protocols.effects import After, Send
from protocols.gateway_settings import Failover

GAUGE_EVERY_S = 1.0


class ReportGauges:
    """Timer: send queue depth and tokens to Metrics."""


class PacerActor(HostActor):
    role = roles.PACER

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.logic: PacerLogic | None = None

    def on_wire(self, wire: m.Wire) -> None:
        self.role = wire.role
        if self.logic is None:
            account = roles.pacer_account(wire.role).upper()
            failover = self.settings.failover.get(account, Failover())
            self.logic = PacerLogic(
                account.lower(),
                self.settings.accounts[account],
                keys=failover.keys,
                circuit=CircuitSettings.from_config(self.settings),
                fallbacks=[list(f) for f in failover.fallbacks],
                fallback_queue=failover.fallback_queue,
                slice_size=self.settings.lease_slice,
                me=my_address(self),
                secret=secret.get(),
            )
            self.apply([After(GAUGE_EVERY_S, ReportGauges())])
        # Every Wire carries the directory: grants go to the Pools it names, or wait for one.
        # This host's Pools, the member hosts' (docs/scale-out.md), and those known before
        # (a host that left: its Pools are down for good).
        # Each Pool's host (Wire.hosts) lets the Pacer prefer a Pool on the request's host.
        pools = [*roles.pools(self.settings.pools), *filter(roles.is_pool, self.directory)]
        hosts = wire.hosts or {}
        for pool in dict.fromkeys([*pools, *self.logic.pools.at]):
            at = PoolAt(self.directory.get(pool), pool, str(hosts.get(pool, "")))
            self.apply(self.logic.handle(at, None, time.time()))

    def on_message(self, msg, sender, now):
        if self.logic is None:
            return [Send(sender, m.ErrorReply("not_ready", "pacer not wired yet"))] if sender else []
        if isinstance(msg, m.Admin):
            return self._admin(msg, sender, now)
        if isinstance(msg, ReportGauges):
            return [Send(roles.METRICS, m.Records(self.role, self._gauges(now))), After(GAUGE_EVERY_S, ReportGauges())]
        return self.logic.handle(msg, sender, now)

    def state(self, now: float) -> dict:
        return self.logic.state(now) if self.logic else {"wired": False}

    def _admin(self, msg: m.Admin, sender, now) -> list:
        if msg.command == "show":
            return [Send(sender, m.AdminResult(True, self.logic.state(now)))]
        if msg.command == "set":
            try:
                effects = self.logic.configure(msg.args, now)
            except ValueError as exc:
                return [Send(sender, m.AdminResult(False, self.logic.state(now), str(exc)))]
            return effects + [Send(sender, m.AdminResult(True, self.logic.state(now)))]
        return [Send(sender, m.AdminResult(False, {}, f"pacer: unknown command {msg.command!r} (show, set)"))]

    def _gauges(self, now) -> list[dict]:
        state = self.logic.state(now)
        labels = {"provider": self.logic.provider}
        return [
            {"kind": "gauge", "name": "pacer_queue_depth", "labels": labels, "value": state["queue_depth"], "at": now},
            {"kind": "gauge", "name": "pacer_tokens", "labels": labels, "value": state["tokens"], "at": now},
            {"kind": "gauge", "name": "pacer_leases", "labels": labels, "value": state["in_flight"], "at": now},
            {
                "kind": "gauge",
                "name": "pacer_paused_seconds",
                "labels": labels,
                "value": state["paused_for_s"],
                "at": now,
            },
        ] + self.logic.circuit_gauges(now)
