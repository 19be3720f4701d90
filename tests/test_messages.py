"""The message schema and codec: every type round-trips; bad bytes become Invalid values,
never exceptions; and on the real actor system a bad message gets an error reply and
the actor keeps working."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import types
import typing

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import codec
from protocols import messages as m
from tests.support import ROOT

pytestmark = pytest.mark.unit

SAMPLES = {str: "text", int: 7, float: 1.5, bool: True, dict: {"a": [1, "b"]}, list: [1, "x"], bytes: b"\x00\xff"}


def sample(hint):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return sample(next(a for a in typing.get_args(hint) if a is not type(None)))
    if origin is list:
        return [sample(typing.get_args(hint)[0])]
    if origin is dict:
        return {"k": "v"}
    return SAMPLES[hint]


def every_message():
    for cls in m.message_types().values():
        hints = typing.get_type_hints(cls)
        yield cls(**{f.name: sample(hints[f.name]) for f in dataclasses.fields(cls)})


def test_every_message_type_round_trips():
    messages = list(every_message())
    assert len(messages) >= 30
    for msg in messages:
        assert m.decode(m.encode(msg)) == msg


def test_bad_bytes_are_values_saying_what_is_wrong():
    cases = {
        b"\xc1": "not msgpack",
        msgpack.packb({"x": 1}): "expected [tag, version, body]",
        msgpack.packb(["nope", 1, {}]): "unknown message type",
        msgpack.packb(["cancel", 99, {}]): "unsupported version",
        msgpack.packb(["cancel", 1, {"stream_id": "s"}]): "missing field",
        msgpack.packb(
            ["cancel", 1, {"stream_id": 5, "edge_id": "e", "requested_at": 1.0}]
        ): "cancel.stream_id: expected str",
        msgpack.packb(["cancel", 1, {"stream_id": "s", "edge_id": "e", "requested_at": 1.0, "x": 1}]): "unknown field",
        msgpack.packb(["lease_queued", 1, {"lease_id": "l", "position": True}]): "expected int",
    }
    for data, reason in cases.items():
        result = m.decode(data)
        assert isinstance(result, codec.Invalid) and reason in result.reason, (data, result)
    assert isinstance(m.decode({"not": "bytes"}), codec.Invalid)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_decoding_random_bytes_never_raises(data):
    result = m.decode(data)
    assert isinstance(result, codec.Invalid) or hasattr(type(result), "TAG")


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.text(max_size=5),
            st.integers(-(2**63), 2**63 - 1),
            st.none(),
            st.dictionaries(st.text(max_size=3), st.integers(0, 9)),
        ),
        max_size=4,
    )
)
def test_decoding_random_structures_never_raises(raw):
    result = m.decode(msgpack.packb(raw))
    assert isinstance(result, codec.Invalid) or hasattr(type(result), "TAG")


# Values of every kind a field may be sent, right or wrong for it (bool is an int in Python,
# not on the wire's terms; int is a float there).
PROBES = [None, True, 0, 7, -1, 1.5, "", "text", b"\x00", {}, {"k": "v"}, [], [1], ["x"], [{}], [{"a": 1}, {}], [None]]


def conforms(value, hint) -> bool:
    """The hint read directly, value by value: the reference the compiled checks are held to."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is typing.Any:
        return True
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (str, bool, bytes):
        return isinstance(value, hint)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    if hint is list or origin is list:
        if not isinstance(value, list):
            return False
        args = typing.get_args(hint)
        return not args or all(conforms(v, args[0]) for v in value)
    return False


def test_the_compiled_field_checks_say_what_the_type_hints_say():
    # from_wire checks each field with a function made once per class (codec._checker),
    # not by reading the hints on every message: it must accept and refuse exactly what
    # `conforms` (the hints read directly) does, for every field of every message type.
    for cls in m.message_types().values():
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            check = codec._checker(hints[field.name])
            for value in PROBES:
                assert check(value) == conforms(value, hints[field.name]), (cls.__name__, field.name, value)


def test_a_field_of_the_wrong_type_inside_a_list_is_refused():
    raw = ["stream_data", 1, {"stream_id": "s", "seq": 0, "events": [{"type": "delta"}, "not a dict"]}]
    result = m.from_wire(raw)
    assert isinstance(result, codec.Invalid) and "stream_data.events: expected" in result.reason, result
    assert m.from_wire(["stream_data", 1, {"stream_id": "s", "seq": 0, "events": [{"type": "delta"}]}]) == m.StreamData(
        "s", 0, [{"type": "delta"}]
    )


def test_encoding_refuses_objects_that_are_not_messages():
    for thing in ({"a": 1}, "text", codec.Invalid("x")):
        try:
            m.encode(thing)
        except TypeError:
            continue
        raise AssertionError(f"encoded {thing!r}")


PROBE = r"""
import os, sys
from actors import addressing, system
system.prepare("127.0.0.1", os.environ["SLUICE_CLUSTER_SECRET"].encode())
from thespian.actors import ActorSystem
from actors.supervisor import SupervisorActor
from protocols.roles import SUPERVISOR_NAME
from protocols import messages as m
asys = ActorSystem("multiprocTCPBase", capabilities={"Admin Port": int(sys.argv[1])}, logDefs=None)
sup = asys.createActor(SupervisorActor, globalName=SUPERVISOR_NAME)
directory = m.decode(asys.ask(sup, m.encode(m.GetDirectory()), 5))
for role in ("metrics", "pacer:simulated", "coalescer:0", "pool", "threads"):
    target = addressing.from_string(directory.entries[role])
    wire = m.encode(m.Wire(role, {}, {"host": 1}))  # settings that do not fit: refused, nothing rewired
    for bad in (b"garbage", {"python": "object"}, m.encode(m.Performance({})).replace(b"performance", b"performancX"), wire):
        reply = m.decode(asys.ask(target, bad, 5))
        assert isinstance(reply, m.ErrorReply) and reply.code == "bad_message", (role, bad, reply)
    state = m.decode(asys.ask(target, m.encode(m.GetState()), 5))
    assert isinstance(state, m.State) and state.role == role, (role, state)
print("ok")
"""


@pytest.mark.integration  # starts a gateway or a process of its own
def test_an_actor_answers_a_bad_message_with_an_error_and_keeps_working(gateway):
    # A process of its own: ActorSystem() is a per-process singleton.
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(gateway.actor_port)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SLUICE_CLUSTER_SECRET": gateway.cluster_secret()},
    )
    assert result.stdout.strip() == "ok", result.stderr[-3000:]
