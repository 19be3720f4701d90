"""The thread store: chat threads and their messages in one SQLite file (WAL).

One actor owns the file, so SQLite sees a single writer and no edge process ever holds
a write lock. A turn is a user message plus the assistant reply that answers it:

    TurnBegin   inserts both (the reply with status "streaming"), unless the thread's
                last turn has the same user text and is still streaming: then the new
                request joins that turn and nothing is stored (50 identical sends -> 2
                rows, and the coalescing key, which includes the thread, makes them
                share one upstream call too).
    TurnEnd     writes the reply's text and status. "done" and "error" are final and
                may replace "cancelled" (another edge may still have been streaming);
                "cancelled" never replaces a final status.

On start, replies left "streaming" by a crash are marked "interrupted": nothing is lost
silently, and a client reading the thread sees what happened. While running, `Listeners`
keeps which requests (their TurnBegin's token and edge) stream each reply until its
TurnEnd, so that a reply nobody will end does not stay "streaming":

    MemberLost(edge)  the replies only that edge streamed are marked "interrupted" (their
                      clients saw the stream cut; its text so far died with the edge).
    TurnAbandon       the edge stopped waiting for a TurnBegin's answer (the store was
                      busy or frozen past the ask's 5 s) and answered its client 503, or
                      the request was refused at admission after its turn was stored: a
                      turn it stored that nobody else joined is deleted again, and one
                      that arrives after the abandon is refused, so a refusal stores nothing.

A turn's history is what goes upstream as one request body, so it is held to the limit a
client's own body is (`SLUICE_MAX_BODY_BYTES`): a new turn that would take the stored
history past it is refused (`thread_too_long`, 413) and stores nothing. Without it a
client could grow one thread by a megabyte a send and have every later send carry all of
it through the actors and upstream (30 MB per send after 30 sends).

A thread belongs to the API key id that created it (`owner`; NULL with open access). A
caller with a key sees only its own threads: any other is "not found", so thread ids
of other tenants cannot even be confirmed. A caller without one (open access, no keys
file) sees every thread.
"""

from __future__ import annotations

import collections
import logging
import os
import time
import uuid
from dataclasses import dataclass, field

from actors.host import HostActor
from protocols import messages as m
from protocols import roles
from protocols.effects import Send

log = logging.getLogger("sluice.threads")

SCHEMA = """
CREATE TABLE IF NOT EXISTS threads (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    owner TEXT
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    thread_id TEXT NOT NULL REFERENCES threads(id),
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    status TEXT NOT NULL,
    error_code TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_thread ON messages(thread_id, id);
"""

FINAL = ("done", "error")


class ThreadNotFound(LookupError):
    pass


class ThreadTooLong(ValueError):
    pass


@dataclass
class Reply:
    user_id: int | None  # the user message stored with it by a request that is tracked
    tokens: dict[str, str | None] = field(default_factory=dict)  # request token -> its edge id


class Listeners:
    """Which requests stream each reply still "streaming" (pure bookkeeping, no I/O)."""

    def __init__(self, remember: int = 1024):
        self.replies: dict[int, Reply] = {}  # assistant message id -> who streams it
        self.turn_of: dict[str, int] = {}  # request token -> assistant message id
        self.abandoned: collections.OrderedDict[str, None] = collections.OrderedDict()  # before their TurnBegin
        self.remember = remember

    def begun(self, token: str, edge_id: str | None, assistant_id: int, user_id: int, joined: bool) -> None:
        reply = self.replies.setdefault(assistant_id, Reply(None if joined else user_id))
        reply.tokens[token] = edge_id
        self.turn_of[token] = assistant_id

    def was_abandoned(self, token: str) -> bool:
        """True (once) when `token`'s TurnAbandon came first: its TurnBegin must store nothing."""
        if token in self.abandoned:
            del self.abandoned[token]
            return True
        return False

    def ended(self, assistant_id: int) -> None:
        for token in self.replies.pop(assistant_id, Reply(None)).tokens:
            self.turn_of.pop(token, None)

    def edge_lost(self, edge_id: str) -> list[int]:
        """The replies nobody streams any more now that `edge_id` is gone."""
        orphaned = []
        for assistant_id, reply in list(self.replies.items()):
            for token in [t for t, edge in reply.tokens.items() if edge == edge_id]:
                del reply.tokens[token]
                self.turn_of.pop(token, None)
            if not reply.tokens:
                del self.replies[assistant_id]
                orphaned.append(assistant_id)
        return orphaned

    def abandon(self, token: str) -> tuple[int, int | None] | None:
        """(assistant id, user id to delete with it or None) when nobody else streams that
        reply; None otherwise (then a TurnBegin yet to come with `token` is refused)."""
        assistant_id = self.turn_of.pop(token, None)
        if assistant_id is None:
            self.abandoned[token] = None
            while len(self.abandoned) > self.remember:
                self.abandoned.popitem(last=False)
            return None
        reply = self.replies[assistant_id]
        del reply.tokens[token]
        if reply.tokens:
            return None
        del self.replies[assistant_id]
        return assistant_id, reply.user_id


class ThreadStore:
    def __init__(self, path: str):
        import sqlite3  # here, not at the top: only the thread store's process needs it

        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None)  # explicit transactions below
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)
        if "owner" not in {row[1] for row in self.db.execute("PRAGMA table_info(threads)")}:
            self.db.execute("ALTER TABLE threads ADD COLUMN owner TEXT")  # a file from before API keys
        interrupted = self.db.execute(
            "UPDATE messages SET status='interrupted', updated_at=? WHERE status='streaming'", (time.time(),)
        ).rowcount
        if interrupted:
            log.warning("%d replies were cut off by a crash; marked interrupted", interrupted)

    def close(self) -> None:
        self.db.close()

    def create(self, owner: str | None = None) -> tuple[str, float]:
        thread_id, now = uuid.uuid4().hex, time.time()
        self.db.execute("INSERT INTO threads(id, created_at, owner) VALUES (?, ?, ?)", (thread_id, now, owner))
        return thread_id, now

    def messages(self, thread_id: str, owner: str | None = None) -> list[dict]:
        self._require(thread_id, owner)
        rows = self.db.execute(
            "SELECT id, role, content, status, error_code, created_at FROM messages WHERE thread_id=? ORDER BY id",
            (thread_id,),
        )
        keys = ("id", "role", "content", "status", "error_code", "created_at")
        return [dict(zip(keys, row)) for row in rows]

    def begin(
        self, thread_id: str, content: str, owner: str | None = None, max_bytes: int | None = None
    ) -> tuple[list[dict], int, int, bool]:
        """-> (history to send upstream, user message id, assistant message id, joined).
        ThreadTooLong when a new turn's history would hold more than `max_bytes` of text."""
        self._require(thread_id, owner)
        self.db.execute("BEGIN IMMEDIATE")
        try:
            last_two = self.db.execute(
                "SELECT id, role, content, status FROM messages WHERE thread_id=? ORDER BY id DESC LIMIT 2",
                (thread_id,),
            ).fetchall()
            joined = (
                len(last_two) == 2
                and last_two[0][1] == "assistant"
                and last_two[0][3] == "streaming"
                and last_two[1][1] == "user"
                and last_two[1][2] == content
            )
            if joined:
                assistant_id, user_id = last_two[0][0], last_two[1][0]
            else:
                if max_bytes is not None:
                    self._check_size(thread_id, content, max_bytes)
                now = time.time()
                user_id = self._insert(thread_id, "user", content, "complete", now)
                assistant_id = self._insert(thread_id, "assistant", "", "streaming", now)
            history = [
                {"role": role, "content": text}
                for role, text in self.db.execute(
                    "SELECT role, content FROM messages WHERE thread_id=? AND id<=? AND "
                    "(role='user' OR status IN ('done', 'complete')) ORDER BY id",
                    (thread_id, user_id),
                )
            ]
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return history, user_id, assistant_id, joined

    def end(self, assistant_id: int, content: str, status: str, error_code: str | None) -> None:
        if status not in FINAL + ("cancelled", "interrupted"):
            raise ValueError(f"unknown reply status {status!r}")
        replaceable = ("streaming", "cancelled", "interrupted") if status in FINAL else ("streaming",)
        marks = ",".join("?" * len(replaceable))
        self.db.execute(
            f"UPDATE messages SET content=?, status=?, error_code=?, updated_at=? WHERE id=? AND status IN ({marks})",
            (content, status, error_code, time.time(), assistant_id, *replaceable),
        )

    def _check_size(self, thread_id: str, content: str, max_bytes: int) -> None:
        """The history a new turn would send (what `begin` selects), in UTF-8 bytes."""
        (stored,) = self.db.execute(
            "SELECT COALESCE(SUM(LENGTH(CAST(content AS BLOB))), 0) FROM messages WHERE thread_id=? AND "
            "(role='user' OR status IN ('done', 'complete'))",
            (thread_id,),
        ).fetchone()
        total = stored + len(content.encode())
        if total > max_bytes:
            raise ThreadTooLong(
                f"thread {thread_id!r}: its history with this message would be {total} bytes, over "
                f"SLUICE_MAX_BODY_BYTES ({max_bytes}), the most one request sends upstream; start a new thread"
            )

    def interrupt(self, assistant_ids) -> int:
        """Replies still streaming whose edges died: -> how many were marked."""
        now, marked = time.time(), 0
        for assistant_id in assistant_ids:
            marked += self.db.execute(
                "UPDATE messages SET status='interrupted', updated_at=? WHERE id=? AND status='streaming'",
                (now, assistant_id),
            ).rowcount
        return marked

    def unbegin(self, assistant_id: int, user_id: int | None) -> bool:
        """Delete a turn nobody streams (the reply, and the user message stored with it),
        if the reply is still "streaming": -> whether it was."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            deleted = self.db.execute(
                "DELETE FROM messages WHERE id=? AND role='assistant' AND status='streaming'", (assistant_id,)
            ).rowcount
            if deleted and user_id is not None:
                self.db.execute("DELETE FROM messages WHERE id=? AND role='user'", (user_id,))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return bool(deleted)

    def _insert(self, thread_id: str, role: str, content: str, status: str, now: float) -> int:
        cursor = self.db.execute(
            "INSERT INTO messages(thread_id, role, content, status, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
            (thread_id, role, content, status, now, now),
        )
        return cursor.lastrowid

    def _require(self, thread_id: str, owner: str | None = None) -> None:
        row = self.db.execute("SELECT owner FROM threads WHERE id=?", (thread_id,)).fetchone()
        if row is None or (owner is not None and row[0] != owner):
            raise ThreadNotFound(thread_id)


class ThreadStoreActor(HostActor):
    role = roles.THREADS

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.store: ThreadStore | None = None
        self.listeners = Listeners()

    def on_wire(self, wire: m.Wire) -> None:
        if self.store is None:
            self.store = ThreadStore(self.settings.db)

    def on_message(self, msg, sender, now):
        if self.store is None:
            return [Send(sender, m.ErrorReply("not_ready", "thread store not wired yet"))] if sender else []
        try:
            return self._handle(msg, sender)
        except ThreadNotFound as exc:
            return [Send(sender, m.ErrorReply("thread_not_found", f"no thread {exc.args[0]!r}"))]
        except ThreadTooLong as exc:
            return [Send(sender, m.ErrorReply("thread_too_long", str(exc)))]

    def _handle(self, msg, sender) -> list:
        if isinstance(msg, m.ThreadCreate):
            return [Send(sender, m.ThreadInfo(*self.store.create(msg.owner)))]
        if isinstance(msg, m.ThreadGet):
            return [Send(sender, m.ThreadMessages(msg.thread_id, self.store.messages(msg.thread_id, msg.owner)))]
        if isinstance(msg, m.TurnBegin):
            if msg.token is not None and self.listeners.was_abandoned(msg.token):
                return [Send(sender, m.ErrorReply("abandoned", "this turn was abandoned before it was stored"))]
            history, user_id, assistant_id, joined = self.store.begin(
                msg.thread_id, msg.content, msg.owner, self.settings.max_body_bytes
            )
            if msg.token is not None:
                self.listeners.begun(msg.token, msg.edge_id, assistant_id, user_id, joined)
            return [Send(sender, m.TurnBegun(msg.thread_id, history, user_id, assistant_id, joined))]
        if isinstance(msg, m.TurnAbandon):
            if (unstreamed := self.listeners.abandon(msg.token)) is not None:
                if self.store.unbegin(*unstreamed):
                    # Routine since a refused send (a 429 under load) is undone this way too.
                    log.info(
                        "a turn whose request was refused or gave up waiting was deleted (reply %d)", unstreamed[0]
                    )
            return []
        if isinstance(msg, m.TurnEnd):
            self.listeners.ended(msg.assistant_id)
            self.store.end(msg.assistant_id, msg.content, msg.status, msg.error_code)
            return [Send(sender, m.TurnEnded(msg.assistant_id))]
        if isinstance(msg, m.MemberLost) and msg.role == roles.EDGE:
            self._edge_lost(msg.incarnation)
        return []

    def _edge_lost(self, edge_id: str) -> None:
        if marked := self.store.interrupt(self.listeners.edge_lost(edge_id)):
            log.warning("%d replies were cut off by the loss of edge %s; marked interrupted", marked, edge_id)

    def state(self, now: float) -> dict:
        return {"db": self.settings.db if self.settings else None, "open": self.store is not None}

    def on_system(self, msg, sender) -> None:
        from thespian.actors import ActorExitRequest

        if isinstance(msg, ActorExitRequest) and self.store is not None:
            self.store.close()
            self.store = None
