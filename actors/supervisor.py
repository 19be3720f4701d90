"""The Supervisor: creates every other actor, tells each who is where, recreates the dead.

Started by run.py under the global name `SUPERVISOR_NAME` (protocols/roles.py), so any process that joins the
actor system (the edge, `run.py admin`) can find it and ask for the `Directory`.

When a child dies it is recreated, and once the replacement is wired every Pacer and
Coalescer (and for a shard's death every Pool) hears `MemberLost(role, old address)`, so
that what the dead one held (leases, flights, streams it left unopened) is reclaimed
(docs/reliability.md, "Process crashes"). An edge worker's death is reported by run.py
(`MemberLost(edge, edge_id)`) and passed on to every Coalescer shard.

The Supervisor is no single point of failure: run.py's `SupervisorKeeper`
(actors/keeper.py) replaces a dead Supervisor under the same global name and wires it with
the last directory it saw; the new Supervisor adopts the actors of that directory that
answer, and recreates those that do not (after telling them to stop: one may be alive but
stalled). The keeper looks every second, so the adopted actors also tell it the directory
they had (`Ready.previous`): a live actor named there for a role is adopted too, or
stopped if its role is taken (`_learn`, `_candidate_ready`): no role runs twice. Watching run.py itself (shutting the actor
system down when run.py dies) is not done here but in the admin (patches/
thespian_admin_watch.py) or, with the admin gone, by a watchdog process of its own
(`python -S -m actors.watchdog`), so that it does not die with the Supervisor.

Several hosts (docs/scale-out.md): the Supervisor runs on the leader of a Thespian
Convention and hears of every host that joins or leaves it (Thespian's
`ActorSystemConventionUpdate`). A member that joins gets its Pools, created through
Thespian's placement (`targetActorRequirements`: actors/placement.py) on that host and
named with the next free Pool indices, and everyone is re-wired: the Pacers spread calls
over every host's Pools, the member's edges find this Supervisor by its global name. A
member that leaves (de-registered, or silent past Thespian's tuned timers:
patches/thespian_convention.py) takes its Pools out of the directory, and the Pacers and
shards hear `MemberLost` for each, as for a Pool that died on this host.

Coalescer shards spread evenly over the hosts (actors/placement.py `spread`;
docs/scale-out.md): after every join and loss each host holds its share, and as few
shards as possible move. A shard moves by creating the role's new actor on its new host;
the directory names the old one until the new one is Ready, then the new one, and both
hear `ShardMoved` (the old one finishes its flights and stops: actors/shard_handoff.py).
A member that leaves has its shards recreated where the spread puts them, and the Pacers
hear `MemberLost(coalescer:<n>, old address)`, as for a shard that died on this host: the
leases its flights asked for come back, their clients get an error event.

A member's loss follows the rule of a crash on one host (actors/member_loss.py): the
deaths are announced once every actor is up again, so the shards recreated for the lost
ones are in the directory before the Pacers and shards hear `MemberLost` (a loss that
recreates nothing, a member with Pools only, is announced at once).
"""

from __future__ import annotations

import hmac
import logging

from thespian.actors import ActorExitRequest, ActorSystemConventionUpdate, ChildActorExited

from actors import addressing, placement
from actors.coalescer import CoalescerActor
from actors.host import HostActor, my_address
from actors.member_loss import LostMembers, edge_lost_targets
from actors.metrics import MetricsActor
from actors.pacer import PacerActor
from actors.pool import PoolActor
from actors.system import alive
from actors.threads_store import ThreadStoreActor
from protocols import messages as m
from protocols import roles
from protocols.effects import After, Send
from protocols.gateway_settings import Settings

log = logging.getLogger("sluice.supervisor")

WATCH_EVERY_S = 1.0
ADOPT_WITHIN_S = 3.0  # an adopted actor that has not answered its Wire by then is recreated


class Watch:
    """Timer: are the children alive? (Thespian reaps one child per SIGCHLD, so of two
    actors dying together only one ChildActorExited may arrive.)"""


class AdoptDeadline:
    """Timer: adopted actors that never answered are dead; recreate them."""


# The actor class of each kind of role (protocols/roles.py names them).
ACTOR_OF_KIND: dict[str, type] = {
    roles.METRICS: MetricsActor,
    roles.POOL: PoolActor,
    roles.THREADS: ThreadStoreActor,
    roles.PACER: PacerActor,
    roles.COALESCER: CoalescerActor,
}


def child_roles(settings: Settings) -> dict[str, type]:
    names = roles.children(settings.providers, settings.coalescer_shards, settings.pools)
    return {role: ACTOR_OF_KIND[roles.parse(role).kind] for role in names}


class SupervisorActor(HostActor):
    role = roles.SUPERVISOR

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.children: dict[str, object] = {}  # role -> ActorAddress
        self.addresses: dict[str, str] = {}  # role -> "host:port", once the child said Ready
        self.pids: dict[str, int] = {}
        self.adopted: set[str] = set()  # roles taken over from a previous Supervisor
        # role -> address of an actor the predecessor last named for it (an adopted actor's
        # previous directory: `_learn`) that is not the one adopted or created for it
        self.candidates: dict[str, str] = {}
        # actors stopped here as a second actor of a role (`_candidate_ready`): a late Ready
        # or HubReady of theirs changes nothing
        self.superseded: list = []
        self.lost = LostMembers()  # dead incarnations, until announced (actors/member_loss.py)
        self.hubs: dict[str, list] = {}  # Pool role -> [host, port] of its stream hub
        self.generation = 0
        self.draining = False
        self.keys_reloads = 0  # reload-keys commands so far: each edge re-reads its keys file when it grows
        self.stopping = False
        self.started = False
        self.members: dict[str, dict] = {}  # member host -> {"admin", "actor_host", "pools": [roles]}
        self.remote: dict[str, str] = {}  # Pool role -> the member host it runs on
        self.next_pool = 0  # the first Pool index never used yet (a member's Pools never reuse one)
        # shard role -> (old actor, its address, its host: None for this one), until the new one is Ready
        self.moving: dict[str, tuple] = {}
        self.retiring: dict[str, str] = {}  # old actor's address -> its shard role, until it stops
        self.retiring_on: dict[str, str | None] = {}  # old actor's address -> its host (None: this one)

    def on_wire(self, wire: m.Wire) -> None:
        if self.children:
            return  # already running: a second Wire from run.py changes nothing
        # A replacement Supervisor is given the directory its predecessor had: it adopts
        # those actors (they answer the Wire with Ready, pid included) and creates the rest.
        previous = {r: a for r, a in wire.directory.items() if r != roles.SUPERVISOR}
        for role, cls in child_roles(self.settings).items():
            if role in previous:
                self.children[role] = addressing.from_string(previous[role])
                self.adopted.add(role)
                self.started = True  # the edges are up already: offer the hub as soon as the Pool answers
            else:
                self.children[role] = self.createActor(cls)
        # Past every Pool index in use, the members' too (a replacement's predecessor placed
        # them and they run on): two live Pools never answer to one role.
        self.next_pool = 1 + max(roles.pool_index(r) for r in [*self.children, *previous] if roles.is_pool(r))
        # Hosts joining or leaving the Convention (this host leads it, or is alone).
        self.notifyOnSystemRegistrationChanges(True)
        self._wire_all()
        self.apply([After(WATCH_EVERY_S, Watch())] + ([After(ADOPT_WITHIN_S, AdoptDeadline())] if self.adopted else []))

    def _wire_all(self) -> None:
        """Tell every child who is where. A new child's real address is known only when
        it answers its first Wire with Ready; every change of address re-wires everyone."""
        self.generation += 1
        # An adopted actor keeps its predecessor's address here until it answers (or is
        # recreated): the live ones go on serving each other meanwhile. Left out, every
        # actor's directory lost them with the adoption Wire, and a LeaseRelease, OpenStream
        # or LeaseRequest sent before the last Ready was dropped: a lease leaked for good,
        # a client waited for a stream nobody opened (a dead adopted actor makes that 3 s).
        unanswered = {r: _address_string(self.children[r]) for r in self.adopted if r not in self.addresses}
        self.directory = {
            **{r: a for r, a in unanswered.items() if a is not None},
            **self.addresses,
            roles.SUPERVISOR: my_address(self),
        }
        with_keys, public = self.settings.redacted(api_keys=True).to_wire(), self.settings.redacted().to_wire()
        # Which host each Pool runs on: the Pacers prefer a Pool on the request's host.
        hosts = {
            role: self.remote.get(role, self.settings.cluster_host) for role in self.children if roles.is_pool(role)
        }
        for role, addr in self.children.items():
            self.send(addr, m.encode(self._wire_for(role, hosts, with_keys, public)))
        for old, role in self.retiring.items():  # a moved shard's old actor still runs flights
            self.send(addressing.from_string(old), m.encode(m.Wire(role, self.directory, public, hosts)))

    def _wire_for(self, role: str, hosts: dict, with_keys: dict, public: dict) -> m.Wire:
        settings = with_keys if roles.is_pool(role) else public
        if role in self.remote:  # its hub binds that host's interface
            settings = {**settings, "actor_host": self.members[self.remote[role]]["actor_host"]}
        return m.Wire(role, self.directory, settings, hosts)

    def _learn(self, previous: dict) -> None:
        """An adopted actor's directory before the adoption: its Supervisor's last word,
        newer than the keeper's (which looks every second). An actor it names for a role
        that is not the one adopted or created here (the predecessor recreated or moved it
        after the keeper looked, or died before the keeper saw any directory) is a
        candidate: it is wired too, and `_candidate_ready` keeps one actor per role."""
        for role, address in previous.items():
            if role not in self.children or role in self.candidates or self._superseded(address):
                continue
            if address in (self.addresses.get(role), _address_string(self.children[role])):
                continue
            if address in self.retiring or any(moving[1] == address for moving in self.moving.values()):
                continue
            log.warning("adopting: %s at %s was its last actor, unknown to run.py's keeper", role, address)
            self.candidates[role] = address
            hosts = {r: self.remote.get(r, self.settings.cluster_host) for r in self.children if roles.is_pool(r)}
            settings = self.settings.redacted(api_keys=True).to_wire(), self.settings.redacted().to_wire()
            self.send(addressing.from_string(address), m.encode(self._wire_for(role, hosts, *settings)))

    def _candidate_ready(self, msg: m.Ready) -> None:
        """A candidate (`_learn`) answered: it is alive. If its role's actor has not
        answered yet (the keeper's is dead, or the one created here is not up yet), the
        candidate is adopted and that one is stopped; else it is a second actor of its role,
        and is stopped, its death announced (it may hold leases, flights)."""
        role = msg.role
        del self.candidates[role]
        if self.stopping:
            return
        if role in self.addresses:
            log.warning("adopting: stopping %s at %s, a second actor of its role", role, msg.address)
            self.superseded.append(addressing.from_string(msg.address))
            self.send(self.superseded[-1], ActorExitRequest())
            self.lost.died(role, msg.address)
            self._announce_when_up()
            return
        replaced = self.children[role]
        self.superseded.append(replaced)
        self.send(replaced, ActorExitRequest())  # dead (the keeper's), or not up yet (created here)
        stale = _address_string(replaced)
        if role in self.adopted and stale is not None:
            self.lost.died(role, stale)  # announced before, most likely: reclaiming is idempotent
        self.children[role] = addressing.from_string(msg.address)
        self.adopted.add(role)
        self._on_ready(m.Ready(role, msg.address, msg.pid))

    def _superseded(self, address: str | None) -> bool:
        return address is not None and any(_address_string(a) == address for a in self.superseded)

    def _on_ready(self, msg: m.Ready) -> None:
        if self.candidates.get(msg.role) == msg.address:
            self._candidate_ready(msg)
            return
        if self._superseded(msg.address):
            return
        if msg.previous:
            self._learn(msg.previous)
        if msg.role not in self.children or self.addresses.get(msg.role) == msg.address or msg.address in self.retiring:
            return
        self.addresses[msg.role] = msg.address
        self.pids[msg.role] = msg.pid
        if len(self.addresses) == len(self.children):
            self._wire_all()
            self._hand_off()
            self._announce_lost()
            if self._spread():  # a shard that could not move before (not up, or moving) moves now
                self._wire_all()

    def _hand_off(self) -> None:
        """The directory names the moved shards' new actors now: tell old and new."""
        for role, (old, previous, old_host) in list(self.moving.items()):
            current = self.addresses.get(role)
            if current is None or current == previous:
                continue
            del self.moving[role]
            self.retiring[previous] = role
            self.retiring_on[previous] = old_host
            moved = m.encode(m.ShardMoved(role, previous, current))
            self.send(old, moved)
            self.send(self.children[role], moved)

    def _announce_when_up(self) -> None:
        """The rule of actors/member_loss.py: deaths are announced once every actor is up
        (has answered its Wire); else the last one's Ready announces them (_on_ready)."""
        if len(self.addresses) == len(self.children):
            self._announce_lost()

    def _announce_lost(self) -> None:
        """Everyone knows the replacements now: tell the Pacers and Coalescers (and the
        Pools, of a shard) who died, so they reclaim what the dead held (after the Wire:
        same sender, so in order)."""
        for lost, targets in self.lost.announce(self.children):
            log.warning("announcing the loss of %s at %s", lost.role, lost.incarnation)
            for target in targets:
                self.send(self.children[target], m.encode(lost))
            if not roles.is_coalescer(lost.role):  # a moved shard's old actor reclaims as the others
                for old in self.retiring:
                    self.send(addressing.from_string(old), m.encode(lost))

    def on_message(self, msg, sender, now):
        if isinstance(msg, m.Ready):
            self._on_ready(msg)
            return []
        if isinstance(msg, m.HubReady):
            # Not a candidate's (`_learn`): it re-sends its hub once adopted and wired again.
            origin = _address_string(sender) if sender is not None else None
            stray = self._superseded(origin) or origin in self.candidates.values()
            if roles.is_pool(msg.role) and msg.role in self.children and not stray:
                self.hubs[msg.role] = [msg.host, msg.port]
                self.generation += 1
            return []
        if isinstance(msg, m.GetDirectory):
            return [Send(sender, self._directory())]
        if isinstance(msg, m.Admin):
            return self._admin(msg, sender)
        if isinstance(msg, m.AdminAuth):
            return [Send(sender, self._admin_auth(msg))]
        if isinstance(msg, m.MemberLost) and msg.role == roles.EDGE:
            return self._edge_lost(msg)
        if isinstance(msg, Watch):
            return self._watch()
        if isinstance(msg, AdoptDeadline):
            for role in sorted(self.adopted - set(self.addresses)):
                # It may be alive but stalled (it may hold leases, flights): stopped, so that
                # no second actor of its role runs on beside the new one.
                self.send(self.children[role], ActorExitRequest())
                self._recreate(role)
            return []
        return []

    def _edge_lost(self, msg: m.MemberLost) -> list:
        """run.py saw an edge worker die (edge/worker_set.py): every Coalescer shard drops
        the references that edge held, Metrics the key usage (the addresses are known
        here, not there)."""
        log.warning("announcing the loss of edge %s", msg.incarnation)
        return [Send(self.children[role], msg) for role in edge_lost_targets(self.children)] + [
            Send(old, msg) for old in self.retiring
        ]

    def _directory(self) -> m.Directory:
        complete = len(self.addresses) == len(self.children) > 0
        self.started = self.started or complete
        # An edge starting up waits for a hub: offer them only with a whole directory. Once
        # started, each Pool's hub is offered whenever that Pool is up, also while another
        # actor (another Pool included) is being recreated.
        hubs = {
            role: list(address)
            for role, address in self.hubs.items()
            if complete or (self.started and role in self.addresses)
        }
        settings = {
            "draining": self.draining,
            "complete": complete,
            "keys_reloads": self.keys_reloads,
            "hosts": 1 + len(self.members),  # a leader's edges count client keys cluster-wide once > 1
        }
        return m.Directory(dict(self.directory), hubs.get(roles.POOL, []), settings, self.generation, hubs)

    def state(self, now: float) -> dict:
        return self._state()

    def _all_hubs(self) -> bool:
        return all(role in self.hubs for role in self.children if roles.is_pool(role))

    def _state(self) -> dict:
        return {
            "ready": self._all_hubs() and len(self.addresses) == len(self.children) > 0,
            "wired": bool(self.children),
            "children": sorted(self.children),
            "pids": dict(self.pids),
            "generation": self.generation,
            "draining": self.draining,
            "keys_reloads": self.keys_reloads,
            "members": {
                host: {"pools": list(info["pools"]), "shards": self._shards_on(host)}
                for host, info in sorted(self.members.items())
            },
            "retiring": sorted(self.retiring.values(), key=roles.coalescer_shard),
        }

    def _admin(self, msg: m.Admin, sender) -> list:
        if msg.command == "show":
            return [Send(sender, m.AdminResult(True, self._state()))]
        if msg.command == "drain":
            on = msg.args.get("on", True)
            if not isinstance(on, bool):
                return [Send(sender, m.AdminResult(False, self._state(), "drain: 'on' must be true or false"))]
            self.draining = on
            self.generation += 1
            return [Send(sender, m.AdminResult(True, self._state()))]
        if msg.command == "reload_keys":
            self.keys_reloads += 1
            self.generation += 1
            return [Send(sender, m.AdminResult(True, self._state()))]
        return [
            Send(
                sender,
                m.AdminResult(False, {}, f"supervisor: unknown command {msg.command!r} (show, drain, reload_keys)"),
            )
        ]

    def _admin_auth(self, msg: m.AdminAuth) -> m.AdminResult:
        """The admin CLI proves it holds the same token the HTTP admin routes ask for."""
        token = self.settings.admin_token if self.settings else None
        if not token:
            return m.AdminResult(
                False, {"code": "admin_disabled"}, "the gateway has no SLUICE_ADMIN_TOKEN: admin commands are off"
            )
        presented = msg.token if isinstance(msg.token, str) else ""
        if not presented or not hmac.compare_digest(presented.encode(), token.encode()):
            return m.AdminResult(False, {"code": "unauthorized"}, "SLUICE_ADMIN_TOKEN is not the gateway's admin token")
        return m.AdminResult(True, {})

    def on_system(self, msg, sender) -> None:
        if isinstance(msg, ActorExitRequest):
            self.stopping = True
            # Thespian stops a Supervisor's own children; adopted ones are not, so tell them
            # (and the Pools on member hosts, whose admin is their surrogate parent).
            for role in self.adopted | set(self.remote):
                self.send(self.children[role], ActorExitRequest())
            return
        if isinstance(msg, ActorSystemConventionUpdate):
            member = placement.member_of(msg.remoteCapabilities or {})
            if member is not None and not self.stopping:
                if msg.remoteAdded:
                    self._member_joined(member, _address_string(msg.remoteAdminAddress))
                else:
                    self._member_left(member["host"])
            return
        if isinstance(msg, ChildActorExited) and not self.stopping:
            exited = _address_string(msg.childAddress)
            if exited in self.retiring:
                self._retired(exited)
                self._announce_when_up()
                return
            role = next((r for r, a in self.addresses.items() if a == exited), None)
            if role is not None:
                self._recreate(role)

    def _retired(self, old: str) -> None:
        """A moved shard's old actor stopped. It stops once it holds no flight, but it may
        have died holding some: the Pacers hear of it either way (a lease it no longer
        holds is not reclaimed twice), and its successor stops passing Cancels to it.
        The caller announces the death (_announce_when_up)."""
        role = self.retiring.pop(old)
        self.retiring_on.pop(old, None)
        self.lost.died(role, old)
        current = self.addresses.get(role)
        if current is not None:
            self.send(self.children[role], m.encode(m.ShardMoved(role, "", current)))

    def _member_joined(self, member: dict, admin: str | None) -> None:
        """A host joined the Convention: its Pools, placed on it, join the directory."""
        host = member["host"]
        if host in self.members:
            return  # a re-registration after a blip: its Pools are there
        pools = [roles.pool(i) for i in range(self.next_pool, self.next_pool + member["pools"])]
        self.next_pool += member["pools"]
        # A replacement Supervisor adopted its predecessor's shards wherever they run: those
        # at this member's address are its own (they stay there, and are re-homed if it is lost).
        for role in self._shard_homes():
            if self._adopted_on(role, member["actor_host"]):
                self.remote[role] = host
        self.members[host] = {"admin": admin, "actor_host": member["actor_host"], "pools": pools}
        log.warning("host %s joined the cluster: its Pools %s", host, ", ".join(pools))
        for role in pools:
            self.remote[role] = host
            self.children[role] = self._create(role)
        self._spread()  # its share of the shards, from the hosts that hold the most
        self._wire_all()

    def _adopted_on(self, role: str, actor_host: str) -> bool:
        """Whether `role` is an adopted actor running on the host whose actor system binds
        `actor_host` (not this host's: several hosts on one address cannot be told apart)."""
        if role not in self.adopted or role in self.remote or actor_host == self.settings.actor_host:
            return False
        address = _address_string(self.children[role])
        return address is not None and address.rpartition(":")[0] == actor_host

    def _shard_homes(self) -> dict[str, str | None]:
        return {role: self.remote.get(role) for role in self.children if roles.is_coalescer(role)}

    def _shards_on(self, host: str | None) -> list[str]:
        return sorted((r for r, h in self._shard_homes().items() if h == host), key=roles.coalescer_shard)

    def _place(self, role: str, host: str | None) -> None:
        """`role` runs on `host` (None: this one) from its next creation on."""
        if host is None:
            self.remote.pop(role, None)
        else:
            self.remote[role] = host

    def _spread(self) -> bool:
        """Move the shards that placement.spread says must move (True if any: the caller
        wires the new actors). Only a shard that is up and not moving already moves now;
        the others move once every actor is up again (_on_ready calls this again)."""
        if self.stopping:
            return False
        moved = False
        for role, host in placement.spread(self._shard_homes(), [None, *self.members]).items():
            if role not in self.addresses or role in self.moving:
                continue
            log.warning(
                "moving shard %s from %s to %s", role, self.remote.get(role) or "the leader", host or "the leader"
            )
            self.moving[role] = (self.children[role], self.addresses[role], self.remote.get(role))
            self._place(role, host)
            self.children[role] = self._create(role)
            moved = True
        return moved

    def _member_left(self, host: str) -> None:
        """A host left the Convention (or went silent): its Pools are gone with it, its
        shards are recreated where the spread puts them. The Pacers and shards reclaim what
        the dead held, as for actors that died here: once every actor is up again."""
        if host not in self.members:
            return
        info = self.members.pop(host)
        log.warning("host %s left the cluster: its Pools %s are gone", host, ", ".join(info["pools"]))
        for role, (old, previous, old_host) in list(self.moving.items()):
            if self.remote.get(role) == host:  # its new actor never took over: the old one plays on
                del self.moving[role]
                self.children[role] = old
                self._place(role, old_host)
                dead = self.addresses.get(role)
                if dead != previous:  # the new one had answered: the old one answers the next Wire
                    self.addresses.pop(role)
                    self.pids.pop(role, None)
                    self.lost.died(role, dead)
            elif old_host == host:  # its old actor died as it moved: the new one takes over
                del self.moving[role]
                if self.addresses.get(role) == previous:
                    self.addresses.pop(role)
                    self.pids.pop(role, None)
                self.lost.died(role, previous)
        for old, on in list(self.retiring_on.items()):
            if on == host:  # a moved shard's old actor, gone with its host
                self._retired(old)
        homes = self._shard_homes()
        for role, to in placement.spread(homes, [None, *self.members]).items():
            if homes[role] != host:
                continue  # a live shard's move: _spread, below
            log.warning("recreating shard %s of host %s on %s", role, host, to or "the leader")
            self._place(role, to)
            self.children[role] = self._create(role)
            self.pids.pop(role, None)
            self.adopted.discard(role)
            dead = self.addresses.pop(role, None)
            if dead is not None:
                self.lost.died(role, dead)
        for role in info["pools"]:
            self.remote.pop(role, None)
            self.children.pop(role, None)
            self.pids.pop(role, None)
            self.hubs.pop(role, None)
            self.adopted.discard(role)
            dead = self.addresses.pop(role, None)
            if dead is not None:
                self.lost.died(role, dead)
        self._spread()
        self._wire_all()
        self._announce_when_up()

    def _create(self, role: str):
        cls = ACTOR_OF_KIND[roles.kind(role)]
        if role in self.remote:
            return self.createActor(cls, targetActorRequirements={placement.HOST: self.remote[role]})
        return self.createActor(cls)

    def _recreate(self, role: str) -> None:
        log.warning("actor %s exited; recreating it", role)
        dead = self.addresses.pop(role, None)
        if dead is None and role in self.adopted:
            dead = _address_string(self.children[role])
        if dead is not None:
            self.lost.died(role, dead)
        self.adopted.discard(role)
        self.pids.pop(role, None)
        self.hubs.pop(role, None)
        if self.moving.pop(role, None) is None:  # else the shard's old actor died as it moved: the new one takes over
            self.children[role] = self._create(role)
        self._wire_all()

    def _watch(self) -> list:
        if self.stopping:
            return []
        for role, child_pid in list(self.pids.items()):
            if role in self.remote:
                continue  # a pid on another host: its admin tells us when it exits
            if not alive(child_pid):
                self._recreate(role)
        return [After(WATCH_EVERY_S, Watch())]


def _address_string(address) -> str | None:
    try:
        return addressing.to_string(address)
    except AttributeError:  # a local address of a child that never started
        return None
