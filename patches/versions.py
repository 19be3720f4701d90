"""The version check every patch makes before it touches someone else's library.

A patch reaches into internals its library never promised to keep, so it is written for
one minor series (e.g. httpcore 1.0.x) and refuses any other: `check()` raises
`UntestedVersion`, with a message that names the patch, the series it was written for and
what is installed. A patch that is only an optimisation catches it, logs one warning and
leaves the library as it is (`fallback()`); a patch that guards security or money lets
it propagate, so the process fails at start instead of running unprotected.
`supported()` is that version preamble of an optimisation, written once (`if not
versions.supported(__name__, LIBRARY, WRITTEN_FOR): return False`); `guarded_install()`
is the whole install for the common case, an optimisation that replaces one method of one
class (the HTTP/2 patches, httpcore_fast_locks).
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


def supported(patch: str, library: str, series: str, without: str = "") -> bool:
    """The version preamble of an optimisation: True where the installed `library` is the
    `series` it was written for; else log one warning (`fallback`, naming what the process
    goes `without` when given) and return False, so the patch leaves the library as it is."""
    try:
        check(patch, library, series)
    except UntestedVersion as exc:
        return fallback(patch, f"{without}; {exc}" if without else str(exc))
    return True


def guarded_install(
    patch: str,
    library: str,
    series: str,
    owner: type,
    name: str,
    replacement: object,
    *,
    needs: tuple[str, ...],
    shape: str,
    without: str,
    also: dict[str, object] | None = None,
) -> bool:
    """Install an optimisation that replaces `owner.<name>` with `replacement` (and each
    `owner.<key>` of `also` with its value, all or none), the way every such patch does: on
    another `library` series than `series`, or where `owner` lacks one of the attributes in
    `needs` (`shape` names it in the warning), leave the library as it is, log one warning
    saying what the process goes `without`, and return False. Idempotent: True at once when
    `replacement` is in already."""
    if not supported(patch, library, series, without):
        return False
    if getattr(owner, name, None) is replacement:
        return True
    if not all(hasattr(owner, attribute) for attribute in needs):
        return fallback(patch, f"{shape} is not the expected shape; {without}")
    for attribute, value in {name: replacement, **(also or {})}.items():
        setattr(owner, attribute, value)
    return True


def replaced(owner: type, replacements: dict[str, object]) -> bool:
    """Whether every `owner.<key>` is its value (a patch's `installed()`)."""
    return all(getattr(owner, attribute, None) is value for attribute, value in replacements.items())
