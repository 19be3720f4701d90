"""patches/thespian_turns.py: a frame and its ACK are each read in one turn of Thespian's
transport loop, a sender waits for its ACK without a writable turn first, and the DEBUG
lines nobody writes are not formatted — with Thespian's behaviour otherwise unchanged.

The unit tests drive a real `TCPTransport` (its own listening socket, no actor system)
over a real loopback connection, once with Thespian's own methods and once patched: the
same outcome (the envelope delivered, the ACK sent, the intent finished as Sent, a broken
frame dropped), in one call patched where Thespian alone needs two. The integration test
runs a real actor system with every sluice patch (`actors/system.prepare`) and checks
delivery, order, large frames, crossing bursts on one connection and dead letters."""

from __future__ import annotations

import pickle
import socket
import subprocess
import sys

import pytest
from thespian.actors import Actor, ActorAddress, ActorExitRequest, ChildActorExited, DeadEnvelope
from thespian.system import transport
from thespian.system.transport import IPBase, SendStatus, TransmitIntent, streamBuffer
from thespian.system.transport import TCPTransport as tcp

from patches import thespian_turns
from tests.support import ROOT, free_port

pytestmark = pytest.mark.unit

TURNS = [
    (tcp.IdleSocket, "expired"),
    (tcp.TCPTransport, "_next_XMIT_2"),
    (tcp.TCPTransport, "_next_XMIT_4"),
    (tcp.TCPTransport, "_handleReadableIncoming"),
    (transport.TransmitIntent, "identify"),
    (transport.ReceiveEnvelope, "identify"),
    (transport.ReceiveEnvelope, "__str__"),
]


@pytest.fixture(params=["thespian", "patched"])
def variant(request, monkeypatch):
    """Thespian's own methods, or patches/thespian_turns.py's; put back as they were after."""
    for owner, name in TURNS:
        monkeypatch.setattr(owner, name, thespian_turns._originals.get((owner, name), owner.__dict__[name]))
    for name in ("_originals", "_identities"):
        monkeypatch.setattr(thespian_turns, name, {})
    for name in ("_xmit_2", "_xmit_4", "_readable", "_now"):
        monkeypatch.setattr(thespian_turns, name, None)
    if request.param == "patched":
        assert thespian_turns.install() and thespian_turns.installed()
    else:
        assert not thespian_turns.installed()
    return request.param


def address(port: int) -> ActorAddress:
    return ActorAddress(IPBase.TCPv4ActorAddress("127.0.0.1", port, external=True))


@pytest.fixture
def endpoint():
    """A real TCPTransport (listening on loopback, no actor system) and a connected pair of
    sockets: `near` is the transport's side (non-blocking, as Thespian keeps it), `far` the peer's."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    admin = address(listener.getsockname()[1])
    made = tcp.TCPTransport(tcp.ExternalTransportCopy(), admin, False, False)
    far = socket.create_connection(listener.getsockname())
    near, _ = listener.accept()
    near.setblocking(False)
    yield made, near, far
    for each in (far, near, listener):
        each.close()
    made.close()


def frame(message, sender: ActorAddress) -> bytes:
    """A data frame as Thespian's sender makes it (signed too when this process installed that)."""
    return streamBuffer.toSendBuffer((sender, message), tcp.serializer.dumps)


def calls_until(step, done, limit=10) -> int:
    for count in range(1, limit + 1):
        step()
        if done():
            return count
    raise AssertionError(f"not done after {limit} calls")


def test_a_frame_that_is_all_there_is_read_and_acknowledged_in_one_call(variant, endpoint):
    made, near, far = endpoint
    peer = address(far.getsockname()[1])
    far.sendall(frame({"n": 1, "pad": "x" * 3000}, peer))
    incoming = tcp.TCPIncomingPersistent(ActorAddress(None), near)
    state = {"inc": incoming}

    def step():
        state["inc"] = made._handleReadableIncoming(state["inc"])

    calls = calls_until(step, lambda: made._incomingEnvelopes)
    assert calls == (1 if variant == "patched" else 2)  # Thespian reads 20 bytes, then the rest a turn later
    (envelope,) = made._incomingEnvelopes
    assert envelope.message == {"n": 1, "pad": "x" * 3000} and envelope.sender == peer
    assert state["inc"] is None  # the connection went back to the idle sockets, kept for the next frame
    assert made._openSockets[tcp.opsKey(peer)].socket is near
    far.settimeout(5)
    ack = streamBuffer.ReceiveBuffer(tcp.serializer.loads)
    while not ack.isDone():
        ack.addMore(far.recv(ack.remainingAmount()))
    assert ack.completed()[0] == streamBuffer.ackPacket


def test_a_frame_that_arrives_in_pieces_waits_for_the_rest_without_a_pause(variant, endpoint):
    made, near, far = endpoint
    peer = address(far.getsockname()[1])
    whole = frame("the message", peer)
    far.sendall(whole[:30])
    incoming = tcp.TCPIncomingPersistent(ActorAddress(None), near)
    for _ in range(3):  # as many turns as it takes to read what is there
        incoming = made._handleReadableIncoming(incoming)
        assert incoming is not None and not made._incomingEnvelopes
        if incoming.remainingSize() == len(whole) - 30:
            break
    assert incoming.remainingSize() == len(whole) - 30
    # The patch must not back off a socket whose rest simply has not come yet: the loop would
    # leave it out of select for 20 ms (Thespian only pauses a socket select called readable).
    if variant == "patched":
        assert not hasattr(incoming, "_pauseUntil") and not incoming.failCount
    far.sendall(whole[30:])
    incoming = made._handleReadableIncoming(incoming)
    assert incoming is None and [e.message for e in made._incomingEnvelopes] == ["the message"]


def test_a_frame_cut_off_by_a_close_is_dropped_and_its_socket_closed(variant, endpoint):
    made, near, far = endpoint
    whole = frame("never whole", address(far.getsockname()[1]))
    far.sendall(whole[:40])
    far.shutdown(socket.SHUT_WR)
    incoming = tcp.TCPIncomingPersistent(ActorAddress(None), near)
    state = {"inc": incoming}

    def step():
        state["inc"] = made._handleReadableIncoming(state["inc"])

    calls_until(step, lambda: state["inc"] is None)
    assert not made._incomingEnvelopes and incoming.socket is None
    assert not made._openSockets


def test_a_frame_that_does_not_deserialize_is_refused_as_thespian_refuses_it(variant, endpoint):
    made, near, far = endpoint
    payload = b"not a pickle, not signed" * 4
    far.sendall(b"%d>" % len(payload) + payload)
    state = {"inc": tcp.TCPIncomingPersistent(ActorAddress(None), near)}

    def step():
        state["inc"] = made._handleReadableIncoming(state["inc"])

    calls_until(step, lambda: state["inc"] is None)
    assert not made._incomingEnvelopes
    far.settimeout(5)
    answer = streamBuffer.ReceiveBuffer(tcp.serializer.loads)
    while not answer.isDone():
        answer.addMore(far.recv(answer.remainingAmount()))
    assert answer.completed()[0] == streamBuffer.ackDataErrPacket  # the courtesy answer, then closed
    assert far.recv(100) == b""


def sending(made, near, target: ActorAddress) -> TransmitIntent:
    """An intent on an established connection at the point where Thespian writes its frame."""
    intent = TransmitIntent(target, {"hello": "there"})
    intent.serMsg = made.serializer(intent)
    intent.socket, intent.amtSent, intent.stage = near, 0, made._XMITStepSendData
    return intent


def test_a_sent_frame_waits_for_its_ack_at_once_and_the_ack_is_read_in_one_call(variant, endpoint):
    made, near, far = endpoint
    target = address(far.getsockname()[1])
    intent = sending(made, near, target)
    outcomes = []
    intent.addCallback(lambda result, i: outcomes.append(result), lambda result, i: outcomes.append(result))

    assert made._nextTransmitStep(intent) is True
    if variant == "patched":
        assert intent.stage == made._XMITStepWaitForAck  # no turn to wait for the socket to be writable
    else:
        assert intent.stage == made._XMITStepShutdownWrite
        assert made._nextTransmitStep(intent) is True  # that turn
    assert intent.stage == made._XMITStepWaitForAck
    far.settimeout(5)
    received = streamBuffer.ReceiveBuffer(tcp.serializer.loads)
    while not received.isDone():
        received.addMore(far.recv(received.remainingAmount()))
    assert received.completed()[0] == (made.myAddress, {"hello": "there"})

    far.sendall(streamBuffer.toSendBuffer(streamBuffer.ackPacket, tcp.serializer.dumps))
    calls = calls_until(lambda: made._nextTransmitStep(intent), lambda: made._finished_intents)
    assert calls == (1 if variant == "patched" else 2)  # Thespian reads 20 bytes of the ACK, then the rest
    assert made._finished_intents == [(intent, SendStatus.Sent)]
    assert made._openSockets[tcp.opsKey(target)].socket is near  # kept for the next message
    for finished, status in made._finished_intents:
        finished.tx_done(status)
    assert outcomes == [SendStatus.Sent]


def test_a_frame_that_crosses_the_ack_is_received_and_the_ack_still_counts(variant, endpoint):
    """Both ends sent on the one connection at once: the peer's frame comes before its ACK."""
    made, near, far = endpoint
    target = address(far.getsockname()[1])
    intent = sending(made, near, target)
    calls_until(lambda: made._nextTransmitStep(intent), lambda: intent.stage == made._XMITStepWaitForAck)
    far.settimeout(5)
    received = streamBuffer.ReceiveBuffer(tcp.serializer.loads)
    while not received.isDone():
        received.addMore(far.recv(received.remainingAmount()))
    far.sendall(frame("crossing", target) + streamBuffer.toSendBuffer(streamBuffer.ackPacket, tcp.serializer.dumps))
    calls_until(lambda: made._nextTransmitStep(intent), lambda: made._finished_intents)
    assert made._finished_intents == [(intent, SendStatus.Sent)]
    assert [e.message for e in made._incomingEnvelopes] == ["crossing"]


def test_an_ack_cut_off_by_a_close_means_a_retry_as_in_thespian(variant, endpoint):
    made, near, far = endpoint
    intent = sending(made, near, address(far.getsockname()[1]))
    calls_until(lambda: made._nextTransmitStep(intent), lambda: intent.stage == made._XMITStepWaitForAck)
    ack = streamBuffer.toSendBuffer(streamBuffer.ackPacket, tcp.serializer.dumps)
    far.sendall(ack[:-3])
    far.shutdown(socket.SHUT_WR)
    calls_until(lambda: made._nextTransmitStep(intent), lambda: intent.stage != made._XMITStepWaitForAck)
    assert intent.stage == made._XMITStepSendConnect and not hasattr(intent, "socket")  # retried later
    assert not made._finished_intents


def test_an_idle_connection_expires_when_thespian_says_it_does(variant):
    from datetime import timedelta

    from thespian.system.timing import ExpirationTimer

    a, b = socket.socketpair()
    try:
        idle = tcp.IdleSocket(a, address(1900))
        assert not idle.expired()  # 20 minutes
        for timer, expired in ((ExpirationTimer(timedelta(0)), True), (ExpirationTimer(None), False)):
            idle.validity = timer
            assert idle.expired() is expired
            assert timer.view().expired() is expired  # Thespian's own answer
    finally:
        a.close()
        b.close()


# --- identify() ---------------------------------------------------------------------------------


class Counted:
    shown = 0

    def __str__(self):
        Counted.shown += 1
        return "counted-message"


def test_identify_is_thespians_text_made_only_when_a_log_line_uses_it(variant):
    Counted.shown = 0
    intent = TransmitIntent(address(1900), Counted())
    envelope = transport.ReceiveEnvelope(address(1901), Counted())
    texts = (intent.identify(), envelope.identify())
    assert Counted.shown == (0 if variant == "patched" else 2)
    assert "counted-message" in "%s" % (texts[0],)  # noqa: UP031 (thesplog formats with %)
    assert "counted-message" in str(texts[1])
    assert str(envelope) == str(texts[1]) and "counted-message" in str(intent)
    assert f"{texts[0]:>5}".endswith(str(texts[0]))
    travelled = pickle.loads(pickle.dumps(texts[1]))  # a LogRecord's args go to the logging actor
    assert isinstance(travelled, str) and travelled == str(texts[1])


# --- a real actor system, every sluice patch ---------------------------------------------------


class Sink(Actor):
    """Keeps what it gets, in order, and answers ("dump",) with it. ("burst", target, n, tag):
    sends n numbered messages to target in one go. ("dead letters",): becomes the dead-letter
    handler and keeps each DeadEnvelope's message as ("dead", message). ("doom",): creates a
    child, stops it and, once it has exited, sends it ("late", 0)."""

    def receiveMessage(self, msg, sender):
        if not hasattr(self, "got"):
            self.got = []
        if isinstance(msg, DeadEnvelope):
            self.got.append(("dead", msg.deadMessage))
        elif isinstance(msg, ChildActorExited) and getattr(self, "asker", None):  # Thespian may tell it twice
            self.send(msg.childAddress, ("late", 0))
            self.send(self.asker, "doomed")
            self.asker = None
        elif not isinstance(msg, tuple):
            return
        elif msg == ("dump",):
            self.send(sender, self.got)
        elif msg == ("dead letters",):
            self.handleDeadLetters()
            self.send(sender, "ok")
        elif msg == ("doom",):
            self.asker = sender
            self.send(self.createActor(Sink), ActorExitRequest())
        elif msg[0] == "burst":
            _, target, count, tag = msg
            for n in range(count):
                self.send(target, (tag, n))
        else:
            self.got.append(msg if len(repr(msg)) < 200 else (msg[0], len(msg[1]), msg[1][-8:]))


PROBE = r"""
import os, sys
from actors import system
from patches import thespian_turns
system.prepare("127.0.0.1", os.urandom(32))
assert thespian_turns.installed()
from thespian.actors import ActorSystem
from tests.support import wait_until
from tests.test_thespian_turns import Sink

asys = ActorSystem("multiprocTCPBase", capabilities={"Admin Port": int(sys.argv[1])}, logDefs=None)
try:
    a, b, letters = (asys.createActor(Sink) for _ in range(3))
    assert asys.ask(letters, ("dead letters",), 10) == "ok"
    got = lambda actor: asys.ask(actor, ("dump",), 30)
    # One way: 300 messages sent in one go arrive once each, in order.
    asys.tell(a, ("burst", b, 300, "a"))
    wait_until(lambda: len(got(b)) >= 300, 60, 0.05, "the burst")
    print("one way, in order", got(b) == [("a", n) for n in range(300)])
    # Both ways on the one connection at once: frames cross the other side's ACKs. Each message
    # arrives once (in what order, Thespian does not promise when sends cross: it opens a second
    # connection while the first is busy reading, with or without the patch).
    asys.tell(a, ("burst", b, 300, "x"))
    asys.tell(b, ("burst", a, 300, "y"))
    # A frame of 6 MB arrives in many reads.
    big = "z" * (6 * 1024 * 1024 - 8) + "the-end!"
    asys.tell(a, ("big", big))
    wait_until(lambda: len(got(a)) >= 301 and len(got(b)) >= 600, 60, 0.05, "the crossing bursts")
    got_a, got_b = got(a), got(b)
    ys, xs = sorted(m for m in got_a if m[0] == "y"), sorted(got_b[300:])
    print("both ways, each once", ys == [("y", n) for n in range(300)] and xs == [("x", n) for n in range(300)])
    print("big", [m for m in got_a if m[0] == "big"] == [("big", len(big), "the-end!")] and len(got_a) == 301)
    # A message to an actor that has exited becomes a dead letter, once.
    assert asys.ask(a, ("doom",), 30) == "doomed"
    wait_until(lambda: got(letters), 30, 0.05, "the dead letter")
    print("dead letter", got(letters) == [("dead", ("late", 0))])
finally:
    asys.shutdown()
"""


@pytest.mark.integration  # an actor system of its own
def test_on_a_real_actor_system_every_message_arrives_in_order_and_a_dead_letter_is_one():
    port = free_port()
    # A process of its own: ActorSystem() is a per-process singleton, and the patch is process-wide.
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(port)], cwd=ROOT, capture_output=True, text=True, timeout=180
    )
    expected = ["one way, in order True", "both ways, each once True", "big True", "dead letter True"]
    assert result.stdout.split("\n")[:4] == expected, result.stdout + result.stderr[-3000:]
    with socket.socket() as probe:  # the admin (and every actor with it) is gone
        assert probe.connect_ex(("127.0.0.1", port)) != 0
