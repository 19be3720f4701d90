"""The version check every patch makes before it touches someone else's library.

A patch reaches into internals its library never promised to keep, so it is written for
one minor series (e.g. httpcore 1.0.x) and refuses any other: `check()` raises
`UntestedVersion`, with a message that names the patch, the series it was written for and
what is installed. A patch that is only an optimisation catches it, logs one warning and
leaves the library as it is (`fallback()`); a patch that guards security or money lets
it propagate, so the process fails at start instead of running unprotected.
pyproject.toml pins each patched library to the series its patches were written for.
"""

from __future__ import annotations

import logging
from importlib import metadata

log = logging.getLogger("sluice.patches")


class UntestedVersion(RuntimeError):
    """The installed library is not the series the patch was written for."""


def check(patch: str, library: str, series: str) -> str:
    """The installed version of `library` if it starts with `series` ("1.0."); else raise
    `UntestedVersion`."""
    try:
        version = metadata.version(library)
    except metadata.PackageNotFoundError:
        version = "not installed"
    if not version.startswith(series):
        raise UntestedVersion(
            f"{patch} was written for {library} {series}x and reaches into its internals; this is "
            f"{library} {version}: check the patch against it (then update its WRITTEN_FOR), "
            f"or install {library} {series}x as pyproject.toml pins it"
        )
    return version


def fallback(patch: str, why: str) -> bool:
    """Log that an optional patch is not installed, and why; -> False (what `install()`
    returns then)."""
    log.warning("%s not installed, the library keeps its own behaviour: %s", patch, why)
    return False
