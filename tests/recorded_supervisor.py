"""A `SupervisorActor` whose Thespian side is a record, for tests that drive the
Supervisor without an actor system (test_supervisor_members, test_supervisor_adoption):
each created actor gets an address on the host its requirements name (the leader's,
127.0.0.1, by default) and its class name in `created`; each send is kept decoded in
`sent`; timers and registration changes do nothing."""

from __future__ import annotations

import itertools

from actors import addressing, placement
from actors.supervisor import SupervisorActor
from protocols import config
from protocols import messages as m

LEADER_IP = "127.0.0.1"


class RecordedSupervisor(SupervisorActor):
    myAddress = addressing.from_string(f"{LEADER_IP}:1900")

    def __init__(self, shards: int = 2):
        super().__init__()
        self.ports = itertools.count(20000)
        self.created: list[str] = []
        self.sent: list[tuple[str, object]] = []
        self.settings = config.load({"COALESCER_SHARDS": str(shards), "SIMULATED_BASE_URL": "http://127.0.0.1:9"})

    def createActor(self, actorClass, targetActorRequirements=None, globalName=None, sourceHash=None):
        self.created.append(actorClass.__name__)
        host = (targetActorRequirements or {}).get(placement.HOST, f"{LEADER_IP}:1900")
        return addressing.from_string(f"{host.rpartition(':')[0]}:{next(self.ports)}")

    def send(self, targetAddr, msg):
        decoded = m.decode(msg) if isinstance(msg, bytes) else msg
        self.sent.append((addressing.to_string(targetAddr), decoded))

    def notifyOnSystemRegistrationChanges(self, shouldRegister):
        pass

    def wakeupAfter(self, timePeriod, payload=None):
        pass
