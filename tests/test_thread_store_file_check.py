"""run.py's look at SLUICE_DB before the start (`_check_thread_store_file`): what SQLite
could not open stops the start naming SLUICE_DB, and the look writes nothing. The real
run.py exiting 2: tests/test_lifecycle.py."""

from __future__ import annotations

import os
import sqlite3

import pytest

import run
from protocols import config

pytestmark = pytest.mark.unit


def check(path) -> None:
    run._check_thread_store_file(config.load({"SLUICE_DB": str(path)}))


def test_what_sqlite_could_open_or_create_passes(tmp_path):
    check(tmp_path / "threads.sqlite3")  # absent: the store makes it
    check(tmp_path / "data" / "deeper" / "threads.sqlite3")  # ... and its folders
    (tmp_path / "empty.sqlite3").touch()
    check(tmp_path / "empty.sqlite3")  # SQLite makes a database of an empty file
    sqlite3.connect(tmp_path / "real.sqlite3").execute("CREATE TABLE t(x)").connection.commit()
    check(tmp_path / "real.sqlite3")
    (tmp_path / "link.sqlite3").symlink_to(tmp_path / "real.sqlite3")
    check(tmp_path / "link.sqlite3")


def a_directory(tmp_path):
    (tmp_path / "db").mkdir()
    return tmp_path / "db"


def another_kind_of_file(tmp_path):
    (tmp_path / "notes.txt").write_text("not SQLite " * 200)
    return tmp_path / "notes.txt"


def a_fifo(tmp_path):
    os.mkfifo(tmp_path / "fifo.sqlite3")  # reading it would block for ever
    return tmp_path / "fifo.sqlite3"


def a_link_into_a_file(tmp_path):
    (tmp_path / "data").write_text("x")
    (tmp_path / "link.sqlite3").symlink_to(tmp_path / "data" / "threads.sqlite3")  # dangling
    return tmp_path / "link.sqlite3"


def a_file_where_a_folder_should_be(tmp_path):
    (tmp_path / "data").write_text("x")
    return tmp_path / "data" / "threads.sqlite3"


@pytest.mark.parametrize(
    "make, why",
    [
        (a_directory, "is a directory"),
        (another_kind_of_file, "is not an SQLite database"),
        (a_file_where_a_folder_should_be, "not a directory"),
        (a_fifo, "is not a regular file"),
        (a_link_into_a_file, "not a directory"),
    ],
)
def test_what_sqlite_could_not_open_stops_the_start_naming_sluice_db(tmp_path, make, why):
    with pytest.raises(config.ConfigError, match=f"(?i)SLUICE_DB=.*{why}"):
        check(make(tmp_path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anything")
def test_a_folder_it_cannot_write_stops_the_start_even_with_the_database_in_it(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    sqlite3.connect(folder / "real.sqlite3").execute("CREATE TABLE t(x)").connection.commit()
    folder.chmod(0o500)  # the store's WAL files could not be made beside it
    for path in (folder / "threads.sqlite3", folder / "real.sqlite3"):
        with pytest.raises(config.ConfigError, match="not writable"):
            check(path)


def test_the_look_writes_nothing_to_a_running_gateways_file(tmp_path):
    """A second run.py started by mistake beside a running gateway used to open the file as
    the thread store does, running its crash recovery: every reply still streaming in the
    running gateway was marked interrupted."""
    path = tmp_path / "threads.sqlite3"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE messages(id INTEGER PRIMARY KEY, status TEXT)")
    db.execute("INSERT INTO messages(status) VALUES ('streaming')")
    db.commit()
    before, mtime = path.read_bytes(), path.stat().st_mtime_ns
    check(path)
    assert path.read_bytes() == before and path.stat().st_mtime_ns == mtime
    assert not (tmp_path / "threads.sqlite3-journal").exists() and not (tmp_path / "threads.sqlite3-wal").exists()
    db.close()


def test_an_unwritable_folder_is_refused_with_the_database_in_it_whoever_runs_the_tests(tmp_path, monkeypatch):
    """The same as above where the tests run as root (which may write anything): the folder's
    permission as `os.access` reports it."""
    sqlite3.connect(tmp_path / "real.sqlite3").execute("CREATE TABLE t(x)").connection.commit()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: real_access(p, mode) and os.fspath(p) != str(tmp_path))
    with pytest.raises(config.ConfigError, match="not writable"):
        check(tmp_path / "real.sqlite3")
