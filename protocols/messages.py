"""The message schema: every message sluice's actors and processes exchange.

Control plane (through Thespian, a handful per request):

    edge  --Submit-->  Coalescer  --LeaseRequest-->  Pacer  --OpenStream (on grant)-->  Pool
    edge  <--Admitted/Rejected--  Coalescer  <--LeaseQueued/Granted/Denied/Fallback--  Pacer
    Coalescer --AbortStream / FailStream--> Pool
    Pool --StreamFinished--> Coalescer          Pool --LeaseRelease / AccountPause--> Pacer
    edge --Cancel--> Coalescer                  anyone --Records--> Metrics
    Pacer --SliceGrant / SliceRecall--> Coalescer --SliceReport--> Pacer  (lease slices;
    a shard holding a grant sends OpenStream to the Pool itself; the Pool tells the Pacer
    in LeaseRelease.opened or, if no release goes first, SliceOpened)

Data plane (a msgpack stream from the Pool's stream hub to each edge process, see
docs/architecture.md), after a handshake that authenticates the edge (actors/hub.py):
Subscribe (with the Coalescer's ticket) / Unsubscribe up, StreamData or
SubscribeRefused down.

Actor addresses travel as "host:port" strings (see actors/addressing.py), so no pickled
object of ours is ever on the wire.
"""

from __future__ import annotations

from typing import Any

from protocols.codec import Invalid, decode, encode, from_wire, message, to_wire

__all__ = ["Invalid", "decode", "encode", "from_wire", "to_wire"]

# --- replies that any actor may send -------------------------------------------------


@message("error")
class ErrorReply:
    """The answer to a message that could not be decoded or handled."""

    code: str
    message: str
    request_id: str | None = None


# --- edge <-> Coalescer ----------------------------------------------------------------


@message("submit")
class Submit:
    request_id: str
    key: str  # canonical coalescing key (protocols/keys.py); "" = never coalesce
    provider: str
    model: str
    body: dict  # the normalized upstream request (messages + output-changing params)
    edge_id: str
    received_at: float  # wall-clock time the edge accepted the request
    # The edge's host in the cluster (SLUICE_ACTOR_HOST:SLUICE_ACTOR_PORT, actors/placement.py
    # HOST): a new flight asks the Pacer for a Pool there (LeaseRequest.host). "": no preference.
    host: str = ""


@message("admitted")
class Admitted:
    request_id: str
    stream_id: str
    role: str  # "leader" | "follower"
    error: dict | None = None  # set when a recent identical failure is replayed (error TTL)
    coalesce: bool = True  # may the edge join identical local requests to this stream?
    fanout: bool = True  # do followers get the stream live (else the whole answer at the end)?
    # protocols.auth.ticket(secret, stream_id, Submit.edge_id): the edge shows it to the
    # stream hub in Subscribe; the hub serves the stream to that edge only.
    ticket: str = ""
    # The role of the Pool whose stream hub carries the stream ("pool", "pool:1", ...): the
    # edge subscribes there. "" (a remembered error, or an older shard): "pool".
    hub: str = ""


@message("rejected")
class Rejected:
    request_id: str
    status: int  # HTTP status the edge answers with (429, 503, ...)
    code: str
    message: str
    retry_after_s: float | None = None


@message("cancel")
class Cancel:
    """The last local subscriber of `stream_id` on this edge left (or asked to cancel)."""

    stream_id: str
    edge_id: str
    requested_at: float


# --- Coalescer <-> Pacer -----------------------------------------------------------------


@message("lease_request")
class LeaseRequest:
    """A leader's upstream call, waiting for a slot. It carries what the Pool needs to
    start the call, so that the Pacer's grant goes straight to the Pool as `OpenStream`
    (one hop fewer before the upstream call than granting back through the Coalescer)."""

    lease_id: str  # = the stream id
    provider: str
    requested_at: float
    model: str
    body: dict
    coalescer: str  # address of the shard to tell when the stream ends
    # Set on a request that fell back (LeaseFallback): the provider it was meant for, and
    # the alternatives left to try after this one (this account's own are not used).
    fallback_from: str = ""
    fallbacks: list | None = None
    # The Pool (role) the call must run on: set when the shard asks again for a flight
    # whose edges already listen at that Pool's hub (a fallback, a replaced Pacer).
    # "": the Pacer chooses (actors/pool_choice.py).
    hub: str = ""
    # The host where the flight's first client arrived (Submit.host): the Pacer prefers a
    # Pool on it (docs/scale-out.md, "Pool locality"). "": any.
    host: str = ""


@message("lease_queued")
class LeaseQueued:
    lease_id: str
    position: int
    hub: str = ""  # the Pool (role) the call will run on: its clients listen at its hub


@message("lease_granted")
class LeaseGranted:
    lease_id: str
    queue_wait_ms: float
    pool: str = ""  # incarnation (address) of the Pool the grant's OpenStream went to
    hub: str = ""  # the role of that Pool ("pool", "pool:1", ...)


@message("lease_denied")
class LeaseDenied:
    lease_id: str
    status: int
    code: str
    message: str
    retry_after_s: float | None = None


@message("lease_fallback")
class LeaseFallback:
    """Pacer -> Coalescer: this account cannot serve the call (every key's circuit is open,
    or its queue is past <ACCOUNT>_FALLBACK_QUEUE): ask `provider`'s Pacer for it instead,
    same lease (= stream) id, with `model`; `fallbacks` are the alternatives left after it."""

    lease_id: str
    provider: str
    model: str
    fallbacks: list
    fallback_from: str  # the provider the request was meant for
    reason: str  # "circuits_open" | "queue"


@message("lease_cancel")
class LeaseCancel:
    """Give up a lease that is queued or granted. The Pool may already be running the call
    the Pacer granted (it ends on the FailStream sent with this); its later LeaseRelease
    then finds the lease gone, which the Pacer ignores."""

    lease_id: str


@message("lease_release")
class LeaseRelease:
    """Pool -> Pacer: the upstream call holding this lease has ended."""

    lease_id: str
    retry_after_s: float | None = None  # upstream said 429 Retry-After
    # [[key index, ok]] per attempt that gave a verdict on its key (actors/circuit.py)
    key_results: list | None = None
    # Lease slices: the ids of other calls this Pool opened from a shard's grant since it
    # last told this Pacer (`SliceOpened`, which this saves when a release goes first).
    opened: list | None = None


@message("account_pause")
class AccountPause:
    """Pool -> Pacer: the provider answered 429 and the Pool retries after `pause_s`;
    grant nothing on this account until then, so the next calls do not hit the same wall."""

    account: str
    pause_s: float
    key: int | None = None  # the key (index) that got the 429; None: every key of the account


# --- lease slices: Pacer <-> Coalescer shard (docs/architecture.md, "Lease slices") -------


@message("slice_grant")
class SliceGrant:
    """Pacer -> shard: leases granted ahead of demand (SLUICE_LEASE_SLICE). Each grant is
    `[lease_id, key, keys, hub, pool, host]`: the lease id is the stream id of the call it
    will open, on API key `key` (try `keys` in order), on the Pool `hub` (role) at
    incarnation `pool`, which runs on cluster host `host` ("": one host; the shard uses
    the grant only for a request that arrived there). Its token, concurrency slot and per-minute place are counted at the Pacer as
    held until the shard reports it used or returns it. `pacer` is the granting Pacer's
    incarnation (address): a shard drops the grants of a Pacer that died (`MemberLost`)."""

    role: str  # the Pacer's role ("pacer:<account>"): where the shard reports
    pacer: str
    grants: list
    size: int  # the slice the Pacer aims for: the shard asks for more at half of it


@message("slice_recall")
class SliceRecall:
    """Pacer -> shard: give back every grant you hold unused (a request queued, a key's
    circuit opened, a 429 pause, a settings change); grant nothing more from them."""

    role: str  # the Pacer's role


@message("slice_report")
class SliceReport:
    """Shard -> Pacer: the grants it used since its last report (`used`: their calls went
    to the Pool) and those it gives back unused (`returned`), with `refill` when it wants
    more (its slice is down to half)."""

    coalescer: str  # the shard's address (who holds the slice)
    used: list
    returned: list
    refill: bool = False


@message("slice_opened")
class SliceOpened:
    """Pool -> Pacer: the calls it opened from shards' slice grants (`lease_ids`), which
    the Pacer counted as held (unused) until now: from here they count as in flight on
    this Pool. Sent at most `OPENED_FLUSH_S` after the first of them opened (actors/
    pool_logic.py), and only when no `LeaseRelease.opened` carried them first."""

    pool: str  # the Pool's role
    lease_ids: list


# --- Pacer / Coalescer -> Pool -----------------------------------------------------------


@message("open_stream")
class OpenStream:
    stream_id: str
    provider: str
    model: str
    body: dict
    lease_id: str
    queue_wait_ms: float
    coalescer: str  # address of the shard to tell when the stream ends
    key: int = 0  # the account's API key (index) the lease was granted on
    keys: list | None = None  # the keys to try, attempt after attempt (default: [key])
    fallback_from: str = ""  # the provider the request was meant for, when it fell back
    # A lease slice's grant names the Pool incarnation it was cut on: another incarnation
    # (a replacement) refuses the call, which its Pacer no longer counts ("" = any).
    pool: str = ""


@message("abort_stream")
class AbortStream:
    stream_id: str
    requested_at: float


@message("fail_stream")
class FailStream:
    """End a stream with an error event: one that never opened (lease denied, queue
    timeout), or one everyone left before the Coalescer knew it had opened (the Pacer's
    OpenStream may already have reached the Pool: then the Pool aborts the call)."""

    stream_id: str
    code: str
    message: str


@message("stream_finished")
class StreamFinished:
    stream_id: str
    outcome: str  # "done" | "error" | "cancelled"
    error: dict | None = None
    hub: str = ""  # the role of the Pool that ran it (a StreamFinished may beat the LeaseGranted)


# --- Metrics -----------------------------------------------------------------------------


@message("records")
class Records:
    """A batch of measurement records (see actors/metrics_logic.py for their fields)."""

    source: str
    records: list[dict]


@message("query_performance")
class QueryPerformance:
    last_n: int


@message("performance")
class Performance:
    report: dict


@message("query_prometheus")
class QueryPrometheus:
    pass


@message("prometheus_text")
class PrometheusText:
    text: str


@message("query_alerts")
class QueryAlerts:
    pass


@message("key_admit")
class KeyAdmit:
    """Edge -> Metrics, when several edge processes serve the gateway (SLUICE_WORKERS > 1,
    several hosts): may this client key start one more request? The Metrics actor holds
    every key's usage across all of them (actors/key_limits.py). On success the request
    counts against the key until its `key_finish` record arrives."""

    key_id: str
    provider: str
    model: str
    edge_id: str
    # The key's entry in the asking edge's keys file, without its hash (edge/api_keys.py
    # `ClientKey.to_wire`: rpm, tpm, concurrency, models): Metrics reads no file.
    key: dict | None = None


@message("key_verdict")
class KeyVerdict:
    """None: admitted. Else the refusal: {"status", "type", "code", "message", "retry_after_s"}."""

    denial: dict | None


@message("alerts_report")
class AlertsReport:
    report: dict


# --- edge <-> thread store --------------------------------------------------------------


@message("thread_create")
class ThreadCreate:
    owner: str | None = None  # the creating client's API key id (None: open access)


@message("thread_info")
class ThreadInfo:
    thread_id: str
    created_at: float


@message("thread_get")
class ThreadGet:
    thread_id: str
    owner: str | None = None  # a thread with another owner is "not found" to this caller


@message("thread_messages")
class ThreadMessages:
    thread_id: str
    messages: list[dict]  # {"id", "role", "content", "status", "error_code", "created_at"}


@message("turn_begin")
class TurnBegin:
    """Store a user message and an empty assistant reply, or join an identical turn
    already streaming on this thread (then nothing new is stored)."""

    thread_id: str
    content: str
    owner: str | None = None  # as ThreadGet's
    # The edge process that streams the reply: if it dies (MemberLost(edge)) before its
    # TurnEnd, the store marks the reply "interrupted" rather than "streaming" for ever.
    edge_id: str | None = None
    # This request's own name for the turn, for a TurnAbandon should it stop waiting.
    token: str | None = None


@message("turn_begun")
class TurnBegun:
    thread_id: str
    history: list[dict]  # {"role", "content"} up to and including this turn's user message
    user_id: int
    assistant_id: int
    joined: bool


@message("turn_end")
class TurnEnd:
    assistant_id: int
    content: str
    status: str  # "done" | "error" | "cancelled" | "interrupted"
    error_code: str | None = None


@message("turn_ended")
class TurnEnded:
    assistant_id: int


@message("turn_abandon")
class TurnAbandon:
    """Edge -> thread store (a tell): the TurnBegin named `token` was not answered in time
    (its client got a 503), or its request was then refused at admission (429, 422, 503):
    the turn must not stay stored. Undone if the store did it (unless another request
    joined it), refused if it arrives later."""

    token: str


# --- supervision, discovery, admin -------------------------------------------------------


@message("wire")
class Wire:
    """Supervisor -> child: who is where, and the settings to run with."""

    role: str
    directory: dict  # role -> address string
    settings: dict
    # Pool role -> the host it runs on (actors/placement.py HOST name), for every Pool the
    # directory may name: the Pacer prefers a Pool on the request's host. None: not said.
    hosts: dict | None = None


@message("ready")
class Ready:
    """Child -> Supervisor, in answer to every Wire: I play `role` at `address`.
    `previous`: the directory the child had before, when this Wire came from another
    Supervisor (a replacement adopting it): it names the actors the predecessor created or
    moved last, which run.py's keeper may not have seen (actors/supervisor.py `_learn`)."""

    role: str
    address: str
    pid: int
    previous: dict | None = None


@message("hub_ready")
class HubReady:
    """Pool -> Supervisor: the data-plane hub listens here."""

    host: str
    port: int
    role: str = "pool"  # which Pool's hub


@message("member_lost")
class MemberLost:
    """Supervisor -> every Pacer and Coalescer (a shard's death: every Pool too, whose hub
    ends the streams it left unopened): the process that played `role` at
    `incarnation` (its address) died and has been replaced (this is sent once the
    replacement is wired, so "role" already names the new one). Whatever the dead one
    held is reclaimed, whatever waited on it is re-asked or failed (docs/reliability.md)."""

    role: str
    incarnation: str


@message("shard_moved")
class ShardMoved:
    """Supervisor -> the old and the new actor of a Coalescer shard `role` that moved to
    another host (docs/scale-out.md, "Coalescer shards over the hosts"). The old one
    (`predecessor`) finishes the flights it holds and stops; the new one (`successor`)
    passes a Cancel for a stream it does not know to the old one, which admitted it.
    `predecessor` "" tells the successor the old one has stopped."""

    role: str
    predecessor: str
    successor: str


@message("get_directory")
class GetDirectory:
    pass


@message("directory")
class Directory:
    entries: dict  # role -> address string ("pacer:<provider>", "coalescer:<n>", ...)
    hub: list  # [host, port] of the stream hub of Pool 0 ("pool"), [] while not ready
    settings: dict
    generation: int
    hubs: dict | None = None  # Pool role -> [host, port], for every Pool whose hub is up


@message("get_state")
class GetState:
    pass


@message("state")
class State:
    role: str
    state: dict


@message("admin")
class Admin:
    """An operator command for one actor: `command` with `args` (see docs/operations.md)."""

    command: str
    args: dict


@message("admin_result")
class AdminResult:
    ok: bool
    result: dict
    error: str | None = None


@message("admin_auth")
class AdminAuth:
    """Admin CLI -> Supervisor, before any command: the operator's SLUICE_ADMIN_TOKEN, checked
    against the gateway's. AdminResult(ok) or AdminResult(False, {"code": "unauthorized" |
    "admin_disabled"}, why)."""

    token: str


# --- data plane: edge <-> Pool stream hub ------------------------------------------------


@message("subscribe")
class Subscribe:
    stream_id: str
    ticket: str  # Admitted.ticket: the Coalescer admitted this connection's edge to the stream


@message("subscribe_refused")
class SubscribeRefused:
    """Hub -> edge: this stream is not served on this connection (no valid ticket)."""

    stream_id: str
    code: str  # "forbidden"
    message: str


@message("unsubscribe")
class Unsubscribe:
    stream_id: str


@message("stream_data")
class StreamData:
    """Events of one stream, in order; `seq` is the index of the first event.

    Events are normalized dicts (protocols/events.py). The first frame a subscriber gets
    replays everything the stream produced so far.
    """

    stream_id: str
    seq: int
    events: list[dict]


def message_types() -> dict[str, type]:
    from protocols.codec import _REGISTRY

    return dict(_REGISTRY)


Message = Any


# What answers each question: the edge's bridge drops anything else that arrives while it
# waits (a stray answer to an earlier tell), so a late reply never answers the wrong ask.
REPLIES: dict[type, tuple[type, ...]] = {
    Submit: (Admitted, Rejected),
    LeaseRequest: (LeaseQueued, LeaseGranted, LeaseDenied, LeaseFallback),
    QueryPerformance: (Performance,),
    QueryPrometheus: (PrometheusText,),
    QueryAlerts: (AlertsReport,),
    KeyAdmit: (KeyVerdict,),
    GetDirectory: (Directory,),
    GetState: (State,),
    Admin: (AdminResult,),
    AdminAuth: (AdminResult,),
    ThreadCreate: (ThreadInfo,),
    ThreadGet: (ThreadMessages,),
    TurnBegin: (TurnBegun,),
    TurnEnd: (TurnEnded,),
    Wire: (Ready,),
}
