"""patches/thespian_admin_logs.py on a real actor system: the actors' log lines are the
same with the admin writing them as with Thespian's logger process, and the logger
process is gone.

Each variant runs in a process of its own (ActorSystem() is a per-process singleton, and
the patch is process-wide): an actor and the child it creates log at each level, with an
`extra=` field and a traceback, through sluice's JSON log configuration
(protocols/logfmt.py `actor_log_defs`), and the probe reports the actor system's
processes before it stops it; the lines are read from the probe's stderr."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
from thespian.actors import Actor

from tests.support import ROOT, free_port

pytestmark = pytest.mark.integration  # an actor system of its own


class Talker(Actor):
    """Logs one line at each level (and a traceback) on "talk", in itself and in a child."""

    def receiveMessage(self, msg, sender):
        if msg == "talk":
            child = self.createActor(Talker)
            self.send(child, "talk quietly")
            self._talk("parent")
            self.send(sender, "talked")
        elif msg == "talk quietly":
            self._talk("child")

    def _talk(self, who: str) -> None:
        log = logging.getLogger("probe.talker")
        log.debug("%s: below the level, never written", who)
        log.info("%s: a line at INFO", who)
        log.warning("%s: a warning with a field", who, extra={"request_id": f"req-{who}"})
        try:
            raise ZeroDivisionError("on purpose")
        except ZeroDivisionError:
            log.exception("%s: a traceback", who)


PROBE = r"""
import os, sys, time, types
from actors import system
from patches import thespian_admin_logs
from protocols import logfmt
from tests.support import wait_until
from tests.test_thespian_admin_logs import Talker

settings = types.SimpleNamespace(log_format="json", log_level="INFO")
system.prepare("127.0.0.1", os.urandom(32))
if sys.argv[2] == "thespian":
    thespian_admin_logs.uninstall()
    thespian_admin_logs.install = lambda: False  # system.start prepares again
asys, group = system.start("127.0.0.1", int(sys.argv[1]), os.urandom(32), logfmt.actor_log_defs(settings))
try:
    talker = asys.createActor(Talker)
    assert asys.ask(talker, "talk", 30) == "talked"
    # What the actors forwarded is written before the system stops: wait for the child's last line.
    wait_until(lambda: "child: a traceback" in open(sys.argv[3]).read(), 30, 0.05, "the child's lines")
    # Two actors, the admin, and Thespian's logger process unless the admin writes the lines.
    print("processes", len(system._group_members(group)), flush=True)
finally:
    system.stop(asys, group)
"""


def run_probe(variant: str, tmp_path) -> tuple[int, list[dict]]:
    err = tmp_path / f"{variant}.stderr"
    with open(err, "w") as stderr:
        result = subprocess.run(
            [sys.executable, "-c", PROBE, str(free_port()), variant, str(err)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            timeout=120,
        )
    text = err.read_text()
    assert result.returncode == 0, result.stdout + text[-3000:]
    [processes] = [int(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("processes")]
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    return processes, lines


def shape(line: dict) -> tuple:
    """What a line says, without its time, its actor's address or the traceback's text."""
    return (
        line["level"],
        line["logger"],
        line["message"],
        line.get("request_id"),
        "actorAddress" in line,
        "ZeroDivisionError" in line.get("exc", ""),
    )


def test_the_admin_writes_the_lines_the_logger_process_wrote_and_no_logger_process_runs(tmp_path):
    thespian_processes, thespian_lines = run_probe("thespian", tmp_path)
    patched_processes, patched_lines = run_probe("patched", tmp_path)
    assert thespian_processes == 4 and patched_processes == 3  # the admin, two actors (and the logger)
    talked = sorted(shape(line) for line in thespian_lines if line["logger"] == "probe.talker")
    assert talked == sorted(shape(line) for line in patched_lines if line["logger"] == "probe.talker")
    assert len(talked) == 6  # INFO, WARNING, ERROR from each of the two actors; no DEBUG
    assert ("WARNING", "probe.talker", "child: a warning with a field", "req-child", True, False) in talked
    assert ("ERROR", "probe.talker", "parent: a traceback", None, True, True) in talked
    for lines in (thespian_lines, patched_lines):  # each line whole: one JSON object, none interleaved
        assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
