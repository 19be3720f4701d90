"""The actors' log lines written by Thespian's admin, without a logger process of its own.

Thespian's multiprocTCPBase admin always forks a logger process (`multiprocCommon.
_startLogger` → `logdirector.startupASLogger`): the admin and every actor forward their
log records to it (`ThespianLogForwarder`), and it writes them with the handlers of the
system's `logDefs` (sluice: protocols/logfmt.py `actor_log_defs`, stderr), forwarding
WARNING and above on to the Convention leader's admin when this host is a member. That
process idles at ~6.5 MiB PSS, ~4.4 MiB private: a forked copy of the admin that only
writes lines (bench/NOTES.md "Idle memory").

`install()` makes the admin that logger: `_startLogger` configures the same `logDefs` in
a logging hierarchy of the admin's own (as the logger process configures its logging)
and names the admin itself as the system's logger (it sends itself `LoggerConnected`, so
Thespian's start-up — hold messages until the logger is there, then confirm the start
to run.py — runs as before). Every actor is then started with the admin's address as its
logger and forwards its records there, as it did to the logger process; the admin writes
each record as the logger process did (`getLogger(record.name).handle(record)` in that
hierarchy, the `actorAddress` Thespian's forwarder put on it included), forwards WARNING
and above to the Convention leader's admin as the logger did (`LogAggregator`), and at
shutdown writes the logger's last line. The lines, their format, level, order and
destination do not change; what changes is the process that writes them, and that
a stderr that blocks holds up the admin instead of the logger process (the actors'
forwarding waited on a blocked logger before as well). Installed by
`patches.install_thespian`, before `ActorSystem(...)`: the admin is forked from that
process. Written for Thespian 4.0.x (4.0.1); an optimisation, so on another version it
is left out with a warning and Thespian starts its logger process. No upstream issue.
"""

from __future__ import annotations

import logging
import logging.config

from patches import versions

LIBRARY, WRITTEN_FOR = "thespian", "4.0."

# Thespian's own, by name, to call them and to put them back; empty until installed.
_originals: dict[str, object] = {}


class AdminLogs:
    """The logger process's work, in the admin: the `logDefs` handlers and where WARNING and
    above go on to (the Convention leader's admin, on a member)."""

    def __init__(self, log_defs, aggregator):
        self.aggregator = aggregator
        self.root = logging.RootLogger(logging.WARNING)
        self.manager = logging.Manager(self.root)
        # dictConfig configures the module's root and manager: give it ours for the call, as
        # the logger process replaces its own before configuring (logdirector.startupASLogger).
        saved = logging.root, logging.Logger.root, logging.Logger.manager
        logging.root = logging.Logger.root = self.root
        logging.Logger.manager = self.manager
        try:
            if log_defs:
                logging.config.dictConfig(log_defs)
            else:
                logging.basicConfig()
        finally:
            logging.root, logging.Logger.root, logging.Logger.manager = saved

    def write(self, admin, record: logging.LogRecord) -> None:
        logger = self.root if record.name == self.root.name else self.manager.getLogger(record.name)
        logger.handle(record)
        if self.aggregator is not None and record.levelno >= logging.WARNING:
            from thespian.system.transport import TransmitIntent

            admin._send_intent(TransmitIntent(self.aggregator, record))

    def close(self) -> None:
        self.root.info("ActorSystem Logging Shutdown")  # the logger process's last line
        for handler in self.root.handlers:
            handler.flush()


def install() -> bool:
    """Let this process's admin (and so every admin forked from this process) write the
    actors' log lines itself, with no logger process; False (Thespian unchanged, one warning)
    on a Thespian this was not written for. Idempotent."""
    if not versions.supported(__name__, LIBRARY, WRITTEN_FOR):
        return False
    from thespian.system import multiprocCommon

    if installed():
        return True
    replicator = multiprocCommon.MultiProcReplicator
    needed = (
        "_handleReplicatorMessages",
        "_cleanupAdmin",
        "_cleanupAdminFinish",
        "_reset_logging",
        "h_LoggerConnected",
    )
    if not callable(getattr(multiprocCommon, "_startLogger", None)) or not all(
        callable(replicator.__dict__.get(name)) for name in needed
    ):
        return versions.fallback(__name__, "Thespian's multiprocCommon is not the expected shape")
    _originals["_startLogger"] = multiprocCommon._startLogger
    _originals["_handleReplicatorMessages"] = replicator._handleReplicatorMessages
    _originals["_cleanupAdmin"] = replicator._cleanupAdmin
    multiprocCommon._startLogger = _start_logging_here
    replicator._handleReplicatorMessages = _handle_replicator_messages
    replicator._cleanupAdmin = _cleanup_admin
    return True


def installed() -> bool:
    from thespian.system import multiprocCommon

    return multiprocCommon.__dict__.get("_startLogger") is _start_logging_here


def uninstall() -> None:
    """Put Thespian's own back (tests)."""
    if not _originals:
        return
    from thespian.system import multiprocCommon

    multiprocCommon._startLogger = _originals.pop("_startLogger")
    multiprocCommon.MultiProcReplicator._handleReplicatorMessages = _originals.pop("_handleReplicatorMessages")
    multiprocCommon.MultiProcReplicator._cleanupAdmin = _originals.pop("_cleanupAdmin")


def _start_logging_here(transportClass, transport, admin, capabilities, logDefs, concurrency_context):
    """Thespian's `_startLogger` (called by the admin at its start, and again if its logger
    died), with the admin as the logger."""
    from thespian.system.messages.convention import CONV_ADDR_IPV4_CAPABILITY
    from thespian.system.messages.multiproc import LoggerConnected
    from thespian.system.transport import TransmitIntent
    from thespian.system.utilis import thesplog

    admin.asLogger = None
    admin.asLogProc = None  # no process: nothing for childDied to restart
    aggregator = capabilities.get(CONV_ADDR_IPV4_CAPABILITY, None)
    if aggregator:  # as Thespian's _startLogger reads it
        try:
            if isinstance(aggregator, list):
                aggregator = aggregator[0]
            aggregator = transportClass.getAddressFromString(aggregator)
        except Exception as ex:
            thesplog(
                'Unable to adapt log aggregator address "%s" to a transport address: %s',
                aggregator,
                ex,
                level=logging.WARNING,
            )
    if aggregator == admin.transport.myAddress:
        aggregator = None
    admin._sluice_logs = AdminLogs(logDefs, aggregator or None)
    # What the logger process sends once it is up: the admin's own h_LoggerConnected makes the
    # sender (the admin itself) the system's logger, confirms the start and handles what waited.
    transport.scheduleTransmit(None, TransmitIntent(transport.myAddress, LoggerConnected()))


def _handle_replicator_messages(self, envelope):
    logs = getattr(self, "_sluice_logs", None)  # only an admin that is its own logger has it
    if logs is not None and self.asLogger is not None:
        from thespian.system.logdirector import LogAggregator, LoggerExitRequest, LoggerFileDup

        msg = envelope.message
        if isinstance(msg, logging.LogRecord):
            logs.write(self, msg)
            return True, True
        if isinstance(msg, LogAggregator):  # a member's admin registered with its Convention leader
            logs.aggregator = msg.aggregatorAddress
            return True, True
        if isinstance(msg, (LoggerExitRequest, LoggerFileDup)):
            return True, True
    return _originals["_handleReplicatorMessages"](self, envelope)


def _cleanup_admin(self, finish_cleanup):
    logs = getattr(self, "_sluice_logs", None)
    if logs is None:
        return _originals["_cleanupAdmin"](self, finish_cleanup)
    # Thespian's own asks the logger process to exit and finishes once it was told; the
    # records that reached the admin are written already.
    self.post_cleanup = finish_cleanup
    self._reset_logging()
    logs.close()
    self._cleanupAdminFinish(None, None)
