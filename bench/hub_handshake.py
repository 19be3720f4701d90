"""What the stream hub's handshake (protocols/hub_hello.py) costs an edge connection.

    .venv/bin/python -m bench.hub_handshake [--connections 300]

One process, the real `actors.hub.StreamHub` and loopback TCP. For each of N fresh
connections: the TCP connect, then the handshake (the hub's challenge read, the answer
written), then one `Subscribe` answered with its replay frame; and, on one connection kept
open, N more `Subscribe` round trips. The handshake's cost is once per edge connection
(an edge keeps one connection to the hub); frames after it cost what they did before.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import timeit

import msgpack

from actors.hub import StreamHub
from protocols import auth, hub_hello
from protocols import events as ev
from protocols import messages as m

EDGE_ID = "edge-bench"


async def subscribe_round_trip(reader, writer, unpacker, secret: bytes, stream_id: str) -> None:
    writer.write(m.encode(m.Subscribe(stream_id, auth.ticket(secret, stream_id, EDGE_ID))))
    while True:
        for raw in unpacker:
            assert isinstance(m.from_wire(raw), m.StreamData)
            return
        unpacker.feed(await reader.read(65536))


async def measure(n: int) -> dict:
    secret = auth.new_secret()
    hub = StreamHub(secret)
    port = await hub.start("127.0.0.1")
    hub.mark_open("s-bench")
    hub.publish("s-bench", [ev.delta("x")])
    connect, handshake, first_subscribe, subscribe = [], [], [], []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            t1 = time.perf_counter()
            nonce = await reader.readexactly(hub_hello.NONCE_BYTES)
            writer.write(hub_hello.answer(secret, nonce, EDGE_ID))
            t2 = time.perf_counter()
            await subscribe_round_trip(reader, writer, msgpack.Unpacker(raw=False), secret, "s-bench")
            t3 = time.perf_counter()
            connect.append(t1 - t0)
            handshake.append(t2 - t1)
            first_subscribe.append(t3 - t2)
            writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        nonce = await reader.readexactly(hub_hello.NONCE_BYTES)
        writer.write(hub_hello.answer(secret, nonce, EDGE_ID))
        unpacker = msgpack.Unpacker(raw=False)
        for _ in range(n):
            t0 = time.perf_counter()
            await subscribe_round_trip(reader, writer, unpacker, secret, "s-bench")
            subscribe.append(time.perf_counter() - t0)
        writer.close()
        while hub.connections or hub.handshaking:  # let the hub see every close before stop()
            await asyncio.sleep(0.001)
    finally:
        await hub.stop()
    mac_us = min(timeit.repeat(lambda: hub_hello.answer(secret, nonce, EDGE_ID), number=1000, repeat=5)) * 1000
    ticket_us = (
        min(timeit.repeat(lambda: auth.ticket_ok(secret, "s-bench", EDGE_ID, "0" * 64), number=1000, repeat=5)) * 1000
    )

    def ms(xs):
        return {
            "p50_ms": round(statistics.median(xs) * 1000, 3),
            "p95_ms": round(statistics.quantiles(xs, n=20)[-1] * 1000, 3),
        }

    return {
        "connections": n,
        "tcp_connect": ms(connect),
        "handshake (challenge read, answer written)": ms(handshake),
        "first Subscribe -> replay (the hub checks the answer first)": ms(first_subscribe),
        "Subscribe -> replay on an open connection": ms(subscribe),
        "answer MAC, us": round(mac_us, 2),
        "ticket check, us": round(ticket_us, 2),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.hub_handshake", description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=300)
    args = parser.parse_args(argv)
    result = asyncio.run(measure(args.connections))
    for key, value in result.items():
        print(f"{key}: {value}")
    return result


if __name__ == "__main__":
    main()
