"""Fewer select turns, and no formatting for disabled logs, per Thespian message.

A Thespian message cost each end ~0.16 ms of CPU in `bench.thespian_hop` (more with many
connections open), most of it in the transport's loop (`TCPTransport._runWithExpiry`):
each turn rebuilds its socket lists, asks every intent and incoming socket for its delay,
makes a selector, registers every socket, polls and walks every idle connection. A message on a reused
connection took five turns (`python -m bench.thespian_hop`, cProfile: 10,001 polls for
2,000 messages at each end):

- the sender, after its frame is written (`_next_XMIT_2`), waits one turn for the socket
  to be writable again only to create the ACK buffer (`_next_XMIT_3`, which does nothing
  else: its `shutdown` is commented out upstream);
- the receiver reads a frame in two turns: `ReceiveBuffer` asks for 20 bytes while it does
  not know the length, and the rest is read on the next turn, though it is already there;
- the sender reads the ACK the same way, in two turns.

`install()` makes that two turns (ACK and frame each read at once), keeping Thespian's
protocol as it is — one frame, one ACK, the next frame for that target after the ACK; the
same retries, dead-target and timeout handling — because each change only does now what
the next turn would have done:

- `_next_XMIT_2`: once the frame is written, go on to `_next_XMIT_3` at once;
- `_next_XMIT_4` and `_handleReadableIncoming`: after Thespian's own read, while the frame
  (or ACK) is incomplete and that read made progress, read again without waiting for a
  turn; a read that would block (EAGAIN) hands back to the loop without the back-off pause
  Thespian puts on a socket select called readable (so a large frame that arrives in
  pieces is read as it comes, as before); an error or a close is left to Thespian's own
  handling on the next turn, or handled as Thespian handles it;
- every idle connection is asked on every turn whether it has expired (20 minutes), through
  two new timer objects and four calls: `IdleSocket.expired` now compares the deadline
  with Thespian's clock itself;
- three DEBUG log calls per message end (`'Attempting intent %s'`, `'actualTransmit of
  %s'`, `'ACTOR got %s'`) format the whole message with `identify()` before `thesplog`
  checks its level: `identify()` now returns a lazy text that is formatted only when
  a log line is written (and pickled as the plain text, for a log record that travels).

`python -m bench.thespian_hop --variants fiveturns,signed`: 0.32 → 0.18 ms of CPU per
message (both ends), a hop 0.33 → 0.19 ms; in the gateway (`bench.cores --quick`) sluice's CPU
per 1,000 tokens ~600 → ~540 ms (bench/NOTES.md "Thespian messages, third pass"). Installed by
`patches.install_thespian`, before `ActorSystem(...)`: the admin and every actor are
forked from that process and inherit it. Written for Thespian 4.0.x (4.0.1); an
optimisation, so on another version it is left out with a warning. No upstream issue.
"""

from __future__ import annotations

import logging

from patches import versions

LIBRARY, WRITTEN_FOR = "thespian", "4.0."

# Thespian's own attributes, by (class, name), to call them and to put them back; empty until installed.
_originals: dict[tuple[type, str], object] = {}


def install() -> bool:
    """Read each frame and ACK in one turn, skip the writable turn after a send and format
    identify() only for a log line that is written, in this process and every process forked
    from it; False (Thespian unchanged, one warning) on a Thespian this was not written for.
    Idempotent."""
    if not versions.supported(__name__, LIBRARY, WRITTEN_FOR):
        return False
    from thespian.system.transport import ReceiveEnvelope, TransmitIntent
    from thespian.system.transport.TCPTransport import IdleSocket, TCPTransport

    if installed():
        return True
    replacements = {
        (IdleSocket, "expired"): _idle_expired,
        (TCPTransport, "_next_XMIT_2"): _next_XMIT_2,
        (TCPTransport, "_next_XMIT_4"): _next_XMIT_4,
        (TCPTransport, "_handleReadableIncoming"): _handleReadableIncoming,
        (TransmitIntent, "identify"): _lazy_identify,
        (ReceiveEnvelope, "identify"): _lazy_identify,
        (ReceiveEnvelope, "__str__"): _envelope_str,
    }
    needs = ("_next_XMIT_3", "_check_XMIT_4_done", "_addedDataToIncoming", "_nextTransmitStep")
    if not all(callable(owner.__dict__.get(name)) for owner, name in replacements) or not all(
        callable(getattr(TCPTransport, name, None)) for name in needs
    ):
        return versions.fallback(__name__, "Thespian's TCPTransport is not the expected shape")
    for (owner, name), replacement in replacements.items():
        _originals[(owner, name)] = owner.__dict__[name]
        setattr(owner, name, replacement)
    global _xmit_2, _xmit_4, _readable, _now
    from thespian.system.timing import currentTime

    _now = currentTime
    _xmit_2 = _originals[(TCPTransport, "_next_XMIT_2")]
    _xmit_4 = _originals[(TCPTransport, "_next_XMIT_4")]
    _readable = _originals[(TCPTransport, "_handleReadableIncoming")]
    _identities[TransmitIntent] = _originals[(TransmitIntent, "identify")]
    _identities[ReceiveEnvelope] = _originals[(ReceiveEnvelope, "identify")]
    return True


def installed() -> bool:
    from thespian.system.transport.TCPTransport import TCPTransport

    return TCPTransport.__dict__.get("_handleReadableIncoming") is _handleReadableIncoming


def uninstall() -> None:
    """Put Thespian's own attributes back (tests)."""
    for (owner, name), original in _originals.items():
        setattr(owner, name, original)
    _originals.clear()
    _identities.clear()


# --- the sender: no writable turn after the frame is written, the ACK read in one turn -----------

_xmit_2 = _xmit_4 = _readable = None  # Thespian's own, set by install()


def _next_XMIT_2(self, intent):
    keep = _xmit_2(self, intent)
    if keep is True and getattr(intent, "stage", None) == self._XMITStepShutdownWrite:
        # Written: what the next turn would do once the socket is writable (_next_XMIT_3), now.
        return self._nextTransmitStep(intent)
    return keep


def _next_XMIT_4(self, intent):
    keep = _xmit_4(self, intent)
    while keep is True and _ack_incomplete(self, intent):
        try:
            received = intent.socket.recv(intent.ackbuf.remainingAmount())
        except OSError:  # EAGAIN: the rest is on its way; anything else: the next turn's read reports it
            return True
        if not received:  # closed: the next turn's read sees it and retries, as Thespian does
            return True
        keep = self._check_XMIT_4_done(intent, received)
    return keep


def _ack_incomplete(self, intent) -> bool:
    buffer = getattr(intent, "ackbuf", None)
    return (
        getattr(intent, "stage", None) == self._XMITStepWaitForAck
        and getattr(intent, "socket", None) is not None
        and buffer is not None
        and not buffer.is_empty()  # this turn's read made progress...
        and not buffer.isDone()  # ...and the ACK (or a crossing frame) is not complete yet
        and not hasattr(intent, "_pauseUntil")  # Thespian backed off: leave it to do so
    )


# --- the receiver: a frame read in one turn ------------------------------------------------------


def _handleReadableIncoming(self, inc, has_exclusive_flag=False):
    result = _readable(self, inc, has_exclusive_flag=has_exclusive_flag)
    while result is inc and _frame_incomplete(inc):
        try:
            data = inc.socket.recv(min(1024000, inc.remainingSize()))
        except OSError:  # EAGAIN: the rest is on its way; anything else: the next turn's read reports it
            return inc
        if not data:  # closed mid-frame: an aborted reception, dropped as Thespian drops it
            inc.close()
            return None
        try:
            inc.addData(data)
        except Exception:
            from thespian.system.utilis import thesplog

            thesplog("corrupted incoming data; closing socket", level=logging.WARNING)
            inc.close()
            return None
        result = self._addedDataToIncoming(inc, has_exclusive_flag=has_exclusive_flag)
    return result


def _frame_incomplete(inc) -> bool:
    return (
        getattr(inc, "socket", None) is not None
        and not getattr(inc, "failCount", 0)  # this turn's read succeeded (Thespian counts failures)
        and not hasattr(inc, "_pauseUntil")  # Thespian backed off: leave it to do so
        and not inc.receivedAllData()
    )


# --- per idle connection per turn --------------------------------------------------------------

_now = None  # Thespian's clock (thespian.system.timing.currentTime), set by install()


def _idle_expired(self) -> bool:
    # Thespian's `self.validity.view().expired()` (two objects and four calls), for every idle
    # connection on every turn; the same comparison.
    quit_at = self.validity._time_to_quit
    return quit_at is not None and _now() >= quit_at


# --- identify() for log lines that are not written ---------------------------------------------

_identities: dict[type, object] = {}  # class -> Thespian's own identify(), set by install()


class LazyIdentity:
    """What `identify()` returns: Thespian's text, made on first use as text (`%s`, `str()`,
    `format()`); pickled as that text, for a log record that travels to the logging actor."""

    __slots__ = ("_owner", "_text")

    def __init__(self, owner):
        self._owner, self._text = owner, None

    def __str__(self) -> str:
        if self._text is None:
            identify = next(_identities[cls] for cls in type(self._owner).__mro__ if cls in _identities)
            self._text, self._owner = identify(self._owner), None
        return self._text

    __repr__ = __str__

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    def __reduce__(self):
        return (str, (str(self),))


def _lazy_identify(self):
    return LazyIdentity(self)


def _envelope_str(self) -> str:
    return str(LazyIdentity(self))
