"""The settings side of the sign-off: the production file, prep, restore, verify.

This module owns:
  * the production settings file (`config/production.json`, versioned): every pacer
    setting of every account, the coalescer flags and the alert thresholds. It is the one
    place production lives; `load_production` checks it is complete;
  * `in_force`: every one of those values read back from the running actors
    (`GET /api/admin/state`, `GET /api/admin/alerts`);
  * `differences`: production against what runs, one line per value that differs;
  * `prep`: saves what is in force before changing anything (a JSON file whose path it
    prints), then gives the account under test generous pacer settings, live;
  * `restore`: applies the whole production file to the running actors, reads every value
    back and fails (exit 1) on any difference; `verify` only reads back and compares;
  * `env_lines`: the production file as the environment a restart reads (run.py takes its
    settings from the environment), so that a restart from a shell that sourced the
    restore script comes back with production, never with test values.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from pathlib import Path

from signoff_http import Gateway, SuiteError, env_int

ROOT = Path(__file__).resolve().parent.parent
PRODUCTION_FILE = ROOT / "config" / "production.json"
PACER_KEYS = ("rps", "burst", "concurrency", "rpm", "max_queue", "max_wait_s")
FLAG_KEYS = ("coalesce_enabled", "stream_fanout_enabled", "error_ttl_s")
FLAG_ENV = {
    "coalesce_enabled": "COALESCE_ENABLED",
    "stream_fanout_enabled": "STREAM_FANOUT_ENABLED",
    "error_ttl_s": "COALESCE_ERROR_TTL_S",
}
GENEROUS = 50  # prep: rps, burst and concurrency of the account under test at least this


# --- the production file ----------------------------------------------------------------------------


def production_path() -> Path:
    return Path(os.environ.get("SLUICE_PRODUCTION_SETTINGS") or PRODUCTION_FILE)


def load_production(path: Path | None = None) -> dict:
    """The production file, checked complete: every pacer key for every account, every
    flag, the thresholds as numbers. SuiteError names what is missing."""
    path = path or production_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SuiteError(f"cannot read the production settings file {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise SuiteError(f"the production settings file {path} is not JSON: {exc}") from None
    problems = []
    pacers = data.get("pacers") if isinstance(data, dict) else None
    if not isinstance(pacers, dict) or not pacers:
        problems.append("no 'pacers' object")
        pacers = {}
    for account, values in pacers.items():
        missing = [k for k in PACER_KEYS if not isinstance(values, dict) or k not in values]
        if missing:
            problems.append(f"pacers.{account} lacks {', '.join(missing)}")
    flags = data.get("flags") if isinstance(data, dict) else None
    if not isinstance(flags, dict) or any(k not in flags for k in FLAG_KEYS):
        problems.append(f"'flags' must set {', '.join(FLAG_KEYS)}")
    thresholds = data.get("alert_thresholds") if isinstance(data, dict) else None
    if not isinstance(thresholds, dict) or not all(_is_number(v) for v in thresholds.values()):
        problems.append("'alert_thresholds' must be an object of numbers")
    if problems:
        raise SuiteError(f"the production settings file {path} is incomplete: {'; '.join(problems)}")
    return {
        "pacers": {a.lower(): dict(v) for a, v in pacers.items()},
        "flags": dict(flags),
        "alert_thresholds": dict(thresholds),
        "path": str(path),
    }


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def env_lines(production: dict) -> list[str]:
    """`export NAME=value` for every setting of the file, as protocols/config.py reads
    them at start. Pacer max_queue / max_wait_s are one setting for all accounts there."""
    lines = []
    for account, values in sorted(production["pacers"].items()):
        prefix = account.upper()
        for key in ("rps", "burst", "concurrency"):
            lines.append(f"export {prefix}_{key.upper()}={_num(values[key])}")
        lines.append(f"export {prefix}_RPM={_num(values['rpm']) if values['rpm'] else 0}")  # 0: no cap
    queues = {v["max_queue"] for v in production["pacers"].values()}
    waits = {float(v["max_wait_s"]) for v in production["pacers"].values()}
    if len(queues) != 1 or len(waits) != 1:
        raise SuiteError(
            "the production file gives accounts different max_queue / max_wait_s; a restart can "
            "only set one for all (PACER_MAX_QUEUE, PACER_MAX_WAIT_MS)"
        )
    lines.append(f"export PACER_MAX_QUEUE={queues.pop()}")
    lines.append(f"export PACER_MAX_WAIT_MS={_num(waits.pop() * 1000.0)}")
    for key, name in FLAG_ENV.items():
        value = production["flags"][key]
        lines.append(f"export {name}={('1' if value else '0') if isinstance(value, bool) else _num(value)}")
    for key, value in sorted(production["alert_thresholds"].items()):
        lines.append(f"export SLUICE_ALERT_{key.upper()}={_num(value)}")
    return lines


def _num(value) -> str:
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


# --- what runs --------------------------------------------------------------------------------------


def in_force(gw: Gateway, state: dict | None = None) -> dict:
    """Every setting the production file covers, read back from the running actors."""
    state = state or gw.state()
    results = state["results"]
    return {
        "pacers": {
            role.partition(":")[2]: {k: r["settings"].get(k) for k in PACER_KEYS}
            for role, r in sorted(results.items())
            if role.startswith("pacer:")
        },
        "flags": {role: dict(r["flags"]) for role, r in sorted(results.items()) if role.startswith("coalescer:")},
        "alert_thresholds": gw.thresholds(),
    }


def same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a is b or (type(a) is type(b) and a == b)
    if _is_number(a) and _is_number(b):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    return a == b


def differences(production: dict, running: dict) -> list[str]:
    """One line per value that runs differently from the production file."""
    out = []
    for account, values in running["pacers"].items():
        wanted = production["pacers"].get(account)
        if wanted is None:
            out.append(f"pacer:{account}: runs, but the production file has no settings for it")
            continue
        out += [
            f"pacer:{account} {k}: running {values.get(k)!r}, production {wanted[k]!r}"
            for k in PACER_KEYS
            if not same(values.get(k), wanted[k])
        ]
    for shard, flags in running["flags"].items():
        out += [
            f"{shard} {k}: running {flags.get(k)!r}, production {production['flags'][k]!r}"
            for k in FLAG_KEYS
            if not same(flags.get(k), production["flags"][k])
        ]
    if not running["flags"]:
        out.append("no coalescer shard answered: the flags could not be read back")
    thresholds = running["alert_thresholds"]
    for key in sorted(set(thresholds) | set(production["alert_thresholds"])):
        if key not in production["alert_thresholds"]:
            out.append(f"alert threshold {key}: running {thresholds[key]!r}, not in the production file")
        elif not same(thresholds.get(key), production["alert_thresholds"][key]):
            out.append(
                f"alert threshold {key}: running {thresholds.get(key)!r}, "
                f"production {production['alert_thresholds'][key]!r}"
            )
    return out


def show_pacer(settings: dict) -> str:
    return " ".join(f"{k}={settings[k]}" for k in PACER_KEYS if k in settings)


def describe(running: dict) -> str:
    """Settings in force in one paragraph, for the record."""
    pacers = "; ".join(f"pacer:{a} {show_pacer(v)}" for a, v in running["pacers"].items())
    flags = {json.dumps(f, sort_keys=True) for f in running["flags"].values()}
    flag_text = (
        "flags " + " ".join(f"{k}={v}" for k, v in json.loads(flags.pop()).items())
        if len(flags) == 1
        else f"flags differ between shards: {running['flags']}"
    )
    thresholds = " ".join(f"{k}={v}" for k, v in running["alert_thresholds"].items())
    return f"{pacers}; {flag_text}; alert thresholds {thresholds}"


# --- the account under test ---------------------------------------------------------------------------


def target(gw: Gateway, account: str | None) -> tuple[str, str, dict]:
    """(account, provider to send requests to, admin state); account lower-case."""
    gw.call("GET", "/healthz")  # "no gateway" is the first thing to know
    state = gw.state()
    info = state["gateway"]
    providers = info["providers"]
    account = (account or providers[info["default_provider"]]["account"]).lower()
    if f"pacer:{account}" not in state["results"]:
        pacers = ", ".join(r.partition(":")[2] for r in sorted(state["results"]) if r.startswith("pacer:"))
        raise SuiteError(f"the gateway has no pacer for account {account!r} (pacers: {pacers})")
    matching = [n for n, p in providers.items() if p["account"].lower() == account]
    if not matching:
        raise SuiteError(f"the gateway serves no provider on account {account!r}")
    provider = info["default_provider"] if info["default_provider"] in matching else matching[0]
    return account, provider, state


def set_pacer(gw: Gateway, account: str, values: dict) -> dict:
    return gw.admin("POST", f"/pacer/{account}", values)["results"][f"pacer:{account}"]["settings"]


# --- prep / restore / verify --------------------------------------------------------------------------


def save_dir() -> Path:
    return Path(os.environ.get("SLUICE_SIGNOFF_SAVE_DIR") or ROOT / "data")


def prep(gw: Gateway, account: str | None, say=print) -> list[str]:
    """Save what is in force, then TTFT-test settings for the account under test (live).
    Returns the shell lines for a sourcing shell: the account and the saved file's path,
    never a pacer value (a restart must not pick test values up)."""
    account, _, state = target(gw, account)
    before = in_force(gw, state)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    folder = save_dir()
    folder.mkdir(parents=True, exist_ok=True)
    saved = folder / f"signoff-saved-{stamp}.json"
    saved.write_text(
        json.dumps({"saved_at": stamp, "gateway": gw.url, "account": account, "in_force": before}, indent=2) + "\n",
        encoding="utf-8",
    )
    say(f"prep: the settings in force before prep are saved in {saved}")
    try:
        drift = differences(load_production(), before)
    except SuiteError as exc:
        drift = [str(exc)]
    for line in drift:
        say(f"prep: note: before prep, {line}")
    was = before["pacers"][account]
    wanted = {
        "rps": float(os.environ.get("SLUICE_SIGNOFF_RPS") or max(was["rps"], GENEROUS)),
        "burst": env_int("SLUICE_SIGNOFF_BURST", max(was["burst"], GENEROUS)),
        "concurrency": env_int("SLUICE_SIGNOFF_CONCURRENCY", max(was["concurrency"], GENEROUS)),
    }
    after = set_pacer(gw, account, wanted)
    say(f"prep: pacer:{account} was {show_pacer(was)}")
    say(
        f"prep: pacer:{account} now {show_pacer(after)} (TTFT-test settings, live; do not restart: a "
        f"restart runs the environment's settings)"
    )
    return [f"export SLUICE_SIGNOFF_ACCOUNT={account}", f"export SLUICE_SIGNOFF_SAVED={saved}"]


def apply(gw: Gateway, production: dict, running: dict) -> None:
    """Every production value to the running actors; pacers the gateway does not run are
    skipped (it serves no provider on that account)."""
    for account in running["pacers"]:
        if account in production["pacers"]:
            set_pacer(gw, account, production["pacers"][account])
    gw.admin("POST", "/flags", production["flags"])
    gw.admin("POST", "/alerts/thresholds", production["alert_thresholds"])


def restore(gw: Gateway, say=print) -> tuple[list[str], bool]:
    """Apply the production file, read everything back, compare. Returns the shell lines
    (production as the environment of a restart) and whether every value matched."""
    production = load_production()
    gw.call("GET", "/healthz")
    running = in_force(gw)
    apply(gw, production, running)
    back = in_force(gw)
    wrong = differences(production, back)
    _saved_notes(production, say)
    for account in sorted(set(production["pacers"]) - set(back["pacers"])):
        say(f"restore: pacer:{account} is in the production file but not on this gateway (no provider on it)")
    for account in back["pacers"]:
        say(f"restore: pacer:{account} now {show_pacer(back['pacers'][account])}")
    if wrong:
        say(
            f"restore: FAILED: read back from the running actors, {len(wrong)} value(s) differ from "
            f"{production['path']}:"
        )
        for line in wrong:
            say(f"restore:   {line}")
    else:
        say(
            f"restore: every value read back from the running actors matches {production['path']} "
            f"({len(back['pacers'])} pacers, {len(back['flags'])} coalescer shards, "
            f"{len(back['alert_thresholds'])} alert thresholds)"
        )
    exports = ["unset SLUICE_SIGNOFF_ACCOUNT SLUICE_SIGNOFF_SAVED"] + env_lines(production)
    return exports, not wrong


def verify(gw: Gateway, say=print) -> bool:
    production = load_production()
    wrong = differences(production, in_force(gw))
    for line in wrong:
        say(f"verify: {line}")
    say(f"verify: {'all values match' if not wrong else f'{len(wrong)} value(s) differ from'} {production['path']}")
    return not wrong


def _saved_notes(production: dict, say) -> None:
    """What prep saved, where it differs from production: the operator learns that the
    gateway ran something else before the sign-off (restore puts production, not that)."""
    path = os.environ.get("SLUICE_SIGNOFF_SAVED")
    if not path:
        return
    try:
        saved = json.loads(Path(path).read_text(encoding="utf-8"))["in_force"]
    except (OSError, ValueError, KeyError):
        say(f"restore: note: cannot read what prep saved ({path})")
        return
    for line in differences(production, saved):
        say(f"restore: note: before prep, {line} (production is what is restored)")
