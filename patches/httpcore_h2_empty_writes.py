"""No write lock when HTTP/2 has nothing to write (an optimisation applied to httpcore in the Pool).

httpcore's HTTP/2 connection calls `_write_outgoing_data` after every socket read and
after every DATA frame it acknowledges, so that a WINDOW_UPDATE h2 may have queued goes
out. httpcore opens every stream's window and the connection's by 2**24, and h2 queues
an update only once half a window is used (~8 MB), so nearly every call takes the
connection's write lock, asks h2 for its (empty) buffer, writes nothing and releases the
lock: ~1.7 calls per token, each a dozen Python calls of anyio's lock (`current_task`, the
cancel check, sniffio), on the loop that carries every token.

Here the call returns at once when h2's outgoing buffer is empty and no earlier write
failed; otherwise it is httpcore's own, unchanged. What the skipped call would have done:
wait for a writer that holds the lock (nothing of ours was queued behind it: our bytes
are in the buffer it sends, or there are none), write `b""` (httpcore's `write` returns
on an empty buffer) and re-raise a stored write error (we only skip when there is none;
a write that fails while we read is seen by the next read or write, as before). No
upstream issue.

Installed by `patches.install_httpcore()` in the Pool process. Written for httpcore 1.0.x
(1.0.9) with h2 4.x (`H2Connection._data_to_send`, the buffer `data_to_send()` empties);
an optimisation, so on another httpcore or h2, or a connection of another shape, it logs
a warning and leaves httpcore as it is.
"""

from __future__ import annotations

import h2.config
import h2.connection
from httpcore._async import http2

from patches import versions

LIBRARY, WRITTEN_FOR = "httpcore", "1.0."
H2_LIBRARY, H2_WRITTEN_FOR = "h2", "4."

_original_write_outgoing_data = http2.AsyncHTTP2Connection._write_outgoing_data


async def write_outgoing_data(self, request) -> None:
    """Replacement for `AsyncHTTP2Connection._write_outgoing_data`: httpcore's, skipped
    when h2 has no bytes to send and no write has failed (every DATA frame passes here:
    keep it lean)."""
    if not self._h2_state._data_to_send and self._write_exception is None:
        return
    await _original_write_outgoing_data(self, request)


def _h2_has_its_buffer() -> bool:
    connection = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
    return isinstance(getattr(connection, "_data_to_send", None), bytearray)


def install() -> bool:
    """Patch httpcore's async HTTP/2 connection; False (httpcore unchanged, one warning) if
    httpcore or h2 is not the version and shape this was written against. Idempotent."""
    without = "every DATA frame takes the write lock"
    if not versions.supported(__name__, H2_LIBRARY, H2_WRITTEN_FOR, without):
        return False
    if not _h2_has_its_buffer():
        return versions.fallback(__name__, f"h2's connection keeps no _data_to_send buffer; {without}")
    return versions.guarded_install(
        __name__,
        LIBRARY,
        WRITTEN_FOR,
        http2.AsyncHTTP2Connection,
        "_write_outgoing_data",
        write_outgoing_data,
        needs=("_write_outgoing_data",),
        shape="httpcore's HTTP/2 connection",
        without=without,
    )


def installed() -> bool:
    return http2.AsyncHTTP2Connection._write_outgoing_data is write_outgoing_data
