"""Issue 10, "safe to expose": Thespian's frames are authenticated with the cluster secret
before anything is unpickled (patches/thespian_transport.py), the actors bind SLUICE_ACTOR_HOST
(loopback unless a cluster secret is configured), the secret file is the user's alone and
gone after exit, and the admin CLI needs the admin token (docs/security.md).

The integration tests attack a real gateway the way the issue describes: a pickle whose
unpickling creates a marker file, framed as Thespian frames it, sent to every listening
port of the gateway's process tree but the HTTP edge."""

from __future__ import annotations

import json
import os
import pickle
import socket
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from actors import secret_file
from patches import thespian_transport as transport_auth
from protocols import auth, config
from tests.support import ROOT, Gateway, descendants, listening_ports, request, running_gateway, stream_chat, wait_until

pytestmark = pytest.mark.integration

TOKEN = "transport-test-admin-token"
SECRET = "s" * 16 + "0123456789abcdef0123"  # 36 characters


class Marker:
    """Unpickling this creates `path`: the side effect an attacker's pickle would have."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def frame(payload: bytes) -> bytes:
    """Thespian's TCP framing: b"<length>>" + payload."""
    return b"%d>" % len(payload) + payload


# --- the serializer ----------------------------------------------------------------------------


def test_a_signed_frame_round_trips_and_a_forged_one_is_refused_before_pickle(tmp_path):
    serializer = transport_auth.Authenticated(SECRET.encode())
    assert serializer.loads(serializer.dumps(("addr", {"a": [1, 2]}))) == ("addr", {"a": [1, 2]})

    marker = tmp_path / "pwned"
    evil = pickle.dumps(Marker(str(marker)))
    forged = {
        "no MAC": evil,
        "wrong secret": auth.sign(b"x" * 32, evil),
        "random MAC": os.urandom(auth.MAC_BYTES) + evil,
        "tampered": (lambda s: s[:-2] + bytes([s[-2] ^ 1]) + s[-1:])(serializer.dumps(("addr", "hello"))),
        "short": b"abc",
        "empty": b"",
    }
    for name, payload in forged.items():
        with pytest.raises(transport_auth.FrameRefused):
            serializer.loads(payload)
        assert not marker.exists(), name
    # The control: the same pickle, signed with the right secret, does run (so the marker
    # above would have appeared had the MAC not been checked first).
    serializer.loads(serializer.dumps(Marker(str(marker))))
    assert marker.exists()


def test_thespians_receive_buffer_refuses_a_forged_frame(tmp_path):
    from thespian.system.transport.streamBuffer import ReceiveBuffer

    serializer = transport_auth.Authenticated(SECRET.encode())
    marker = tmp_path / "pwned"
    buffer = ReceiveBuffer(serializer.loads)
    buffer.addMore(frame(pickle.dumps(Marker(str(marker)))))
    assert buffer.isDone()
    with pytest.raises(transport_auth.FrameRefused):
        buffer.completed()
    assert not marker.exists()
    good = ReceiveBuffer(serializer.loads)
    good.addMore(frame(serializer.dumps("ACK")))
    assert good.completed() == ("ACK", b"")


def test_install_signs_the_ack_packets_and_refuses_an_unknown_thespian(monkeypatch):
    from thespian.system.transport import TCPTransport, streamBuffer

    for module, name in (
        (TCPTransport, "serializer"),
        (TCPTransport, "ackMsg"),
        (TCPTransport, "ackDataErrMsg"),
        (streamBuffer, "ackMsg"),
        (streamBuffer, "ackDataErrMsg"),
    ):
        monkeypatch.setattr(module, name, getattr(module, name))  # put back after the test
    transport_auth.install(SECRET.encode())
    assert transport_auth.installed()
    for packet, text in ((TCPTransport.ackMsg, "ACK"), (TCPTransport.ackDataErrMsg, "ACK+DATAERR")):
        size, _, body = packet.partition(b">")
        assert int(size) == len(body) and pickle.loads(auth.verify(SECRET.encode(), body)) == text
    assert streamBuffer.ackMsg == TCPTransport.ackMsg

    monkeypatch.setattr("importlib.metadata.version", lambda name: "4.1.0")
    with pytest.raises(RuntimeError, match=r"written for thespian 4\.0\.x .* this is thespian 4\.1\.0"):
        transport_auth.install(SECRET.encode())


# --- configuration and the secret file ---------------------------------------------------------


def test_actors_off_loopback_need_a_cluster_secret():
    for host in ("127.0.0.1", "127.1.2.3", "::1", "localhost"):
        assert config.load({"SLUICE_ACTOR_HOST": host}).actor_host == host
    for host in ("0.0.0.0", "", "::", "10.0.0.5", "gateway.internal"):
        with pytest.raises(config.ConfigError, match="SLUICE_CLUSTER_SECRET"):
            config.load({"SLUICE_ACTOR_HOST": host})
    assert config.load({"SLUICE_ACTOR_HOST": "0.0.0.0", "SLUICE_CLUSTER_SECRET": SECRET}).cluster_secret == SECRET
    # SLUICE_HOST (the edge) may be anything: it is not the actors' host
    assert config.load({"SLUICE_HOST": "0.0.0.0"}).actor_host == "127.0.0.1"


def test_a_short_cluster_secret_is_refused_without_echoing_it():
    with pytest.raises(config.ConfigError) as refused:
        config.load({"SLUICE_CLUSTER_SECRET": "tooshort-but-secret"})
    assert "at least 32 characters" in str(refused.value) and "tooshort" not in str(refused.value)


def test_the_secret_file_is_created_0600_and_refused_when_others_can_read_it(tmp_path):
    old = os.umask(0)  # even with the most permissive umask
    try:
        path = str(tmp_path / "sub" / "cluster-1.secret")
        secret = secret_file.create(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(secret) >= config.CLUSTER_SECRET_MIN_CHARS and secret_file.read(path) == secret
    assert secret_file.create(path) != secret  # a new one each start, replacing a stale file
    os.chmod(path, 0o640)
    with pytest.raises(secret_file.SecretError, match="readable by others"):
        secret_file.read(path)
    secret_file.remove(path)
    with pytest.raises(secret_file.SecretError, match="no cluster secret file"):
        secret_file.read(path)


def test_the_default_secret_file_is_next_to_the_db_and_named_by_the_actor_port():
    settings = config.load({"SLUICE_DB": "/var/lib/sluice/threads.sqlite3", "SLUICE_ACTOR_PORT": "19600"})
    assert secret_file.path_for(settings) == "/var/lib/sluice/cluster-19600.secret"
    settings = config.load({"SLUICE_SECRET_FILE": "/run/sluice/secret"})
    assert secret_file.path_for(settings) == "/run/sluice/secret"


# --- a real gateway ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exposed():
    """A gateway whose HTTP edge listens on every interface, with its built-in simulated
    provider (so every process run.py starts is in the tree) and an admin token."""
    with running_gateway({"SLUICE_HOST": "0.0.0.0", "SLUICE_ADMIN_TOKEN": TOKEN, "SIMULATED_BASE_URL": ""}) as gw:
        gw.tree = descendants(gw.proc.pid) | {gw.proc.pid}
        yield gw


def cli(gw: Gateway, *args, **env):
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "admin", *args],
        cwd=ROOT,
        env={**base, "SLUICE_ACTOR_PORT": str(gw.actor_port), "SLUICE_DB": gw.db, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def serves_a_chat(gw: Gateway) -> None:
    assert request("GET", gw.url + "/readyz")[0] == 200
    status, _, events = stream_chat(
        gw.url + "/api/chat", {"messages": [{"role": "user", "content": os.urandom(4).hex()}]}
    )
    assert status == 200, events
    assert any(name == "message" and data.get("type") == "delta" for name, data in events), events


def send_frame(address: str, port: int, data: bytes, timeout: float = 3.0) -> bytes:
    """Send `data`; what the peer answered until it closed, until a whole Thespian frame
    came back, or until `timeout` (a peer that is not Thespian may just keep waiting)."""
    import time

    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address, address)
    received = b""
    deadline = time.monotonic() + timeout
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(data)
        try:
            while (left := deadline - time.monotonic()) > 0 and not complete(received):
                s.settimeout(left)
                chunk = s.recv(65536)
                if not chunk:
                    break
                received += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return received


def complete(answer: bytes) -> bool:
    size, sep, body = answer.partition(b">")
    return bool(sep) and size.isdigit() and len(body) >= int(size)


def refused_by_thespian(answer: bytes, secret: bytes) -> bool:
    """Thespian's courtesy answer to a frame it could not read: ACK+DATAERR, signed."""
    size, sep, body = answer.partition(b">")
    if not sep or not size.isdigit() or int(size) != len(body):
        return False
    data = auth.verify(secret, body)
    return data is not None and pickle.loads(data) == "ACK+DATAERR"


def test_only_the_edge_listens_off_loopback(exposed):
    sockets = listening_ports(exposed.tree)
    off_loopback = {(addr, port) for addr, port in sockets if not config.is_loopback(addr)}
    assert off_loopback == {("0.0.0.0", exposed.port)}, sockets
    assert len(sockets) >= 9, sockets  # admin, supervisor, 6 actors, hub, simulated provider, edge


def test_a_forged_pickle_reaches_no_pickle_loads_on_any_port(exposed, tmp_path):
    secret = exposed.cluster_secret().encode()
    targets = sorted((addr, port) for addr, port in listening_ports(exposed.tree) if port != exposed.port)
    marker = tmp_path / "pwned"
    evil = pickle.dumps(Marker(str(marker)))
    variants = {"no MAC": evil, "wrong secret": auth.sign(b"w" * 32, evil), "random MAC": os.urandom(32) + evil}
    # Every (variant, port) at once: a port that is not Thespian's (the hub, the simulated
    # provider, ...) answers nothing and costs send_frame's whole timeout.
    attempts = [(name, addr, port) for name in variants for addr, port in targets]
    with ThreadPoolExecutor(len(attempts)) as pool:
        answers = list(pool.map(lambda a: send_frame(a[1], a[2], frame(variants[a[0]])), attempts))
    assert not marker.exists(), "one of these frames was unpickled: " + repr(attempts)
    refusals = {port for (_, _, port), answer in zip(attempts, answers) if refused_by_thespian(answer, secret)}
    # every Thespian port read the frame to its end and refused it: the admin and each actor
    assert exposed.actor_port in refusals and len(refusals) >= 8, (refusals, targets)
    serves_a_chat(exposed)
    assert not marker.exists()
    # nobody crashed: every port listens still (a recreated actor would listen on a new
    # one, its old port gone). New ports may appear: the edge's bridge opens a Thespian
    # context, with a port of its own, per worker thread on first use.
    tree_now = descendants(exposed.proc.pid) | {exposed.proc.pid}
    assert set(targets) | {("0.0.0.0", exposed.port)} <= listening_ports(tree_now)

    # The control: the same frame signed with the gateway's secret is unpickled (the marker
    # appears), so the refusals above were the MAC's doing, not a harmless payload's.
    send_frame("127.0.0.1", exposed.actor_port, frame(auth.sign(secret, evil)))
    wait_until(marker.exists, timeout=10, message="the signed control frame to be unpickled")
    serves_a_chat(exposed)


def test_the_secret_file_is_the_users_alone(exposed):
    info = os.stat(exposed.secret_file)
    assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.geteuid()


def test_the_admin_cli_needs_the_admin_token(exposed, tmp_path):
    missing = cli(exposed, "show", "supervisor")
    assert missing.returncode == 2 and json.loads(missing.stdout)["error"]["code"] == "unauthorized"
    assert "SLUICE_ADMIN_TOKEN" in missing.stderr
    wrong = cli(exposed, "set-pacer", "simulated", "rps=7", SLUICE_ADMIN_TOKEN="not-the-token")
    assert wrong.returncode == 2 and json.loads(wrong.stdout)["error"]["code"] == "unauthorized", wrong.stderr

    shown = cli(exposed, "show", "pacer", SLUICE_ADMIN_TOKEN=TOKEN)
    assert shown.returncode == 0, shown.stderr
    before = json.loads(shown.stdout)["results"]["pacer:simulated"]["settings"]
    assert before["rps"] != 7  # so the refused set-pacer above changed nothing
    done = cli(exposed, "set-pacer", "simulated", "rps=7", SLUICE_ADMIN_TOKEN=TOKEN)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["results"]["pacer:simulated"]["settings"]["rps"] == 7
    assert cli(exposed, "set-pacer", "simulated", f"rps={before['rps']}", SLUICE_ADMIN_TOKEN=TOKEN).returncode == 0

    # a copy of the secret that others may read is refused, with a message
    leaky = tmp_path / "leaky.secret"
    leaky.write_text(exposed.cluster_secret())
    os.chmod(leaky, 0o644)
    refused = cli(exposed, "show", SLUICE_ADMIN_TOKEN=TOKEN, SLUICE_SECRET_FILE=str(leaky))
    assert refused.returncode == 2 and "readable by others" in refused.stderr, refused.stderr


def test_the_admin_cli_is_refused_by_a_gateway_without_an_admin_token(gateway):
    refused = cli(gateway, "show", SLUICE_ADMIN_TOKEN="any-token")
    assert refused.returncode == 2, refused.stderr
    assert json.loads(refused.stdout)["error"]["code"] == "admin_disabled"


def test_the_secret_file_is_gone_after_run_py_exits():
    gw = Gateway({"SIMULATED_BASE_URL": ""}).start()
    try:
        assert os.path.exists(gw.secret_file)
    finally:
        gw.stop()
        try:
            wait_until(lambda: gw.leftovers() == (set(), set()), timeout=15, message="no process or port left")
            assert not os.path.exists(gw.secret_file)
        finally:
            gw.kill_leftovers()


def test_actors_off_loopback_without_a_cluster_secret_refuse_to_start():
    env = {**os.environ, "SLUICE_ACTOR_HOST": "0.0.0.0", "SLUICE_PORT": "0", "PYTHONPATH": str(ROOT)}
    env.pop("SLUICE_CLUSTER_SECRET", None)
    done = subprocess.run(
        [sys.executable, str(ROOT / "run.py")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "SLUICE_ACTOR_HOST='0.0.0.0' is off loopback: set SLUICE_CLUSTER_SECRET" in done.stderr


def test_actors_on_every_interface_with_a_cluster_secret(tmp_path):
    with running_gateway(
        {
            "SLUICE_ACTOR_HOST": "0.0.0.0",
            "SLUICE_CLUSTER_SECRET": SECRET,
            "SLUICE_ADMIN_TOKEN": TOKEN,
            "SIMULATED_BASE_URL": "",
        }
    ) as gw:
        serves_a_chat(gw)
        assert not os.path.exists(gw.secret_file)  # a configured secret is never written to disk
        shown = cli(gw, "show", "supervisor", SLUICE_ADMIN_TOKEN=TOKEN, SLUICE_CLUSTER_SECRET=SECRET)
        assert shown.returncode == 0 and json.loads(shown.stdout)["results"]["supervisor"]["ready"], shown.stderr
        marker = tmp_path / "pwned"
        answer = send_frame("127.0.0.1", gw.actor_port, frame(pickle.dumps(Marker(str(marker)))))
        assert refused_by_thespian(answer, SECRET.encode()) and not marker.exists()
