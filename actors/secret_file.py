"""Where a process finds the cluster secret, and the file run.py keeps it in.

`SLUICE_CLUSTER_SECRET` when it is configured (the same value on every process of the
cluster). Otherwise run.py makes a random one at each start (`create`), in a file only its
user may read (`SLUICE_SECRET_FILE`, default `cluster-<SLUICE_ACTOR_PORT>.secret` next to
`SLUICE_DB`, so two gateways on one machine never share one), and removes it on exit;
the admin CLI reads it (`read`), refusing a file that others could read. The secret
itself is a string (config's rule: at least 32 characters); its UTF-8 bytes are the key.
"""

from __future__ import annotations

import os
import stat

from protocols import auth
from protocols.config import CLUSTER_SECRET_MIN_CHARS
from protocols.gateway_settings import Settings


class SecretError(Exception):
    """No usable secret: the message says what to do."""


def path_for(settings: Settings) -> str:
    configured = settings.secret_file
    if configured:
        return configured
    directory = os.path.dirname(os.path.abspath(settings.db))
    return os.path.join(directory, f"cluster-{settings.actor_port}.secret")


def create(path: str) -> bytes:
    """A fresh random secret, written to `path` with mode 0600 from the first byte on (a
    temporary file created 0600 and renamed into place: no moment where others may read it,
    and a stale file of a killed gateway is replaced whole)."""
    text = auth.new_secret().hex()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask, exactly 0600
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return text.encode()


def remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def read(path: str) -> bytes:
    """The secret in `path`; SecretError when it is missing, not ours, or readable by others."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise SecretError(
            f"no cluster secret file at {path}: is the gateway running (with this SLUICE_DB / "
            "SLUICE_ACTOR_PORT, or SLUICE_SECRET_FILE)? or set SLUICE_CLUSTER_SECRET"
        ) from None
    except OSError as exc:
        raise SecretError(f"cannot read the cluster secret file {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if info.st_uid != os.geteuid():
            raise SecretError(f"the cluster secret file {path} belongs to another user (uid {info.st_uid}): refused")
        if stat.S_IMODE(info.st_mode) & 0o077:
            raise SecretError(
                f"the cluster secret file {path} is readable by others (mode "
                f"{stat.S_IMODE(info.st_mode):04o}): refused; it must be 0600"
            )
        text = os.read(fd, 4096).decode("utf-8", "replace").strip()
    finally:
        os.close(fd)
    if len(text) < CLUSTER_SECRET_MIN_CHARS:
        raise SecretError(f"the cluster secret file {path} holds no valid secret")
    return text.encode()


def for_client(settings: Settings) -> bytes:
    """The secret a process joining a running gateway uses (admin CLI, `actors.system stop`)."""
    if settings.cluster_secret:
        return settings.cluster_secret.encode()
    return read(path_for(settings))
