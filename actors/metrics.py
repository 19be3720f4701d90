"""The Metrics actor: hosts MetricsLogic (samples, percentiles, Prometheus text) and the
AlertEvaluator (the sign-off sheet's four rules, evaluated every few seconds).

When several edge processes serve client keys (SLUICE_WORKERS > 1, several hosts), it also
holds every key's usage across them (actors/key_limits.py; no keys file here: each ask
carries the key's entry): it answers `KeyAdmit`, takes the `key_*` records out of the
batches, and renders the `sluice_key_*` lines of /metrics.

Admin commands (edge/admin_routes.py): show, reset (forget the windowed samples),
alerts (thresholds + firing/pending), set_thresholds (live, validated all-or-nothing)."""

from __future__ import annotations

import logging

from actors.alerts import AlertEvaluator
from actors.host import HostActor
from actors.key_limits import KINDS as KEY_RECORDS
from actors.key_limits import KeyLimits
from actors.metrics_logic import MetricsLogic
from protocols import messages as m
from protocols import roles
from protocols.effects import After, Send

log = logging.getLogger("sluice.alerts")

EVALUATE_EVERY_S = 5.0


class EvaluateAlerts:
    """Timer: evaluate the alert rules."""


class MetricsActor(HostActor):
    role = roles.METRICS

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.logic = MetricsLogic()
        self.alerts: AlertEvaluator | None = None
        self.key_limits = KeyLimits()

    def on_wire(self, wire: m.Wire) -> None:
        if self.alerts is None:
            self.alerts = AlertEvaluator(self.settings.alert_thresholds or None)
            self.apply([After(EVALUATE_EVERY_S, EvaluateAlerts())])

    def on_message(self, msg, sender, now):
        if isinstance(msg, m.Records):
            records = msg.records
            for record in (r for r in records if isinstance(r, dict) and r.get("kind") in KEY_RECORDS):
                self.key_limits.ingest(record)
            records = [r for r in records if not (isinstance(r, dict) and r.get("kind") in KEY_RECORDS)]
            self.logic.ingest(records, now)
            return []
        if isinstance(msg, m.KeyAdmit):
            denial = self.key_limits.admit(msg.key_id, msg.provider, msg.model, msg.edge_id, msg.key)
            return [Send(sender, m.KeyVerdict(denial))]
        if isinstance(msg, m.MemberLost) and msg.role == roles.EDGE:
            released = self.key_limits.edge_lost(msg.incarnation)
            if released:
                log.warning(
                    "edge %s lost: %d requests it held no longer count against their keys", msg.incarnation, released
                )
            return []
        if isinstance(msg, m.QueryPerformance):
            return [Send(sender, m.Performance(self.logic.performance(msg.last_n, now)))]
        if isinstance(msg, m.QueryPrometheus):
            keys = self.key_limits.prometheus()
            return [Send(sender, m.PrometheusText(self.logic.prometheus(now) + keys))]
        if isinstance(msg, m.QueryAlerts):
            report = self.alerts.alerts(now) if self.alerts else {"firing": [], "pending": []}
            return [Send(sender, m.AlertsReport(report))]
        if isinstance(msg, EvaluateAlerts):
            for transition in self.alerts.evaluate(self.logic, now):
                log.warning("alert %s", transition)
            return [After(EVALUATE_EVERY_S, EvaluateAlerts())]
        if isinstance(msg, m.Admin):
            return self._admin(msg, sender, now)
        return []

    def state(self, now: float) -> dict:
        """What GetState (the admin "show") reports: the summary of the samples held."""
        return self.logic.summary(now)

    def _admin(self, msg: m.Admin, sender, now) -> list:
        """show, reset, alerts (thresholds + firing/pending), set_thresholds (live)."""
        if msg.command == "show":
            return [Send(sender, m.AdminResult(True, self.logic.summary(now)))]
        if msg.command == "reset":
            self.logic.reset(now)
            return [Send(sender, m.AdminResult(True, self.logic.summary(now)))]
        if msg.command in ("alerts", "set_thresholds"):
            if self.alerts is None:
                return [Send(sender, m.AdminResult(False, {}, "metrics: alerts are not set up yet"))]
            if msg.command == "set_thresholds":
                try:
                    self.alerts.configure(msg.args)  # validates everything before changing anything
                except ValueError as exc:
                    return [Send(sender, m.AdminResult(False, self._alerts(now), str(exc)))]
            return [Send(sender, m.AdminResult(True, self._alerts(now)))]
        return [
            Send(
                sender,
                m.AdminResult(
                    False, {}, f"metrics: unknown command {msg.command!r} (show, reset, alerts, set_thresholds)"
                ),
            )
        ]

    def _alerts(self, now) -> dict:
        return {"thresholds": dict(self.alerts.thresholds), **self.alerts.alerts(now)}
