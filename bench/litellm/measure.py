"""Measure: load cells in a loadgen process of their own, the measures of the comparison
(`Bench`), the py-spy role labels, and the lease leak check."""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.litellm.run import (
    GATEWAYS,
    IDLE_WINDOW_S,
    RESULTS,
    ROOT,
    SIM_INTERVAL_MS,
    SIM_TOKENS,
    SIM_TTFT_MS,
    TARGETS,
    LiteLLM,
    MemSampler,
    Sim,
    Sluice,
    _die_with_parent,
    cpu_seconds,
    direct_target,
    f0,
    f1,
    foreign_cores,
    log,
    proc_tree,
    pss_kib,
    request,
    rss_kib,
    system_cpu_seconds,
)
from protocols import roles as role_names

# ----------------------------------------------------------------------------- load


LOADGENS: set[subprocess.Popen] = set()


def run_cell(spec: dict, hard_timeout: float) -> dict:
    """Run one load cell in a loadgen process of its own; returns its JSON result."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.litellm_loadgen"],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=_die_with_parent,
    )
    LOADGENS.add(proc)
    try:
        out, err = proc.communicate(json.dumps(spec).encode(), timeout=hard_timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError(f"loadgen cell exceeded {hard_timeout}s: {spec['target']['name']}") from None
    finally:
        LOADGENS.discard(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen failed ({proc.returncode}): {err.decode(errors='replace')[-2000:]}")
    return json.loads(out)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    if len(v) == 1:
        return v[0]
    k = (len(v) - 1) * q / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def med(values) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarize_streams(result: dict, upstream: dict | None = None) -> dict:
    """`upstream`: first prompt line -> the simulator's record of that call (started_at,
    first_byte_at), to split TTFT into admission (client start -> upstream receives the
    call) and delivery (upstream's first byte -> the client reads the first token)."""
    recs = result["records"]
    measured = [r for r in recs if not r.get("warmup")]
    ok = [r for r in measured if r["ok"] and r["ttft"] is not None]
    ttft_ms = [r["ttft"] * 1000 for r in ok]
    admission, delivery, edge_in, actor_path = [], [], [], []
    for r in ok:
        call = (upstream or {}).get(r["text"].split("\n")[0])
        if call and call.get("started_at") and call.get("first_byte_at"):
            admission.append((call["started_at"] - r["t0"]) * 1000)
            delivery.append(r["ttft"] * 1000 - (call["first_byte_at"] - r["t0"]) * 1000)
            if r.get("gw_ttft_ms") is not None:
                # sluice's meta ttft_ms = Pool's first byte - edge's received_at, so (taking the
                # Pool's first byte ~ the simulator's) the edge received the request at:
                received = call["first_byte_at"] - r["gw_ttft_ms"] / 1000
                edge_in.append((received - r["t0"]) * 1000)
                actor_path.append((call["started_at"] - received) * 1000)
    gaps = []
    for r in ok:
        t = r["tok"]
        gaps.extend((b - a) * 1000 for a, b in zip(t, t[1:]))
    errors: dict[str, int] = {}
    for r in recs:
        if not r["ok"]:
            errors[r["error"] or "unknown"] = errors.get(r["error"] or "unknown", 0) + 1
    return {
        "n": len(measured),
        "ok": len(ok),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "ttft_p50": pct(ttft_ms, 50),
        "ttft_p95": pct(ttft_ms, 95),
        "ttft_p99": pct(ttft_ms, 99),
        "gap_p50": pct(gaps, 50),
        "gap_p95": pct(gaps, 95),
        "gap_p99": pct(gaps, 99),
        "admission_p50": pct(admission, 50),
        "admission_p95": pct(admission, 95),
        "delivery_p50": pct(delivery, 50),
        "delivery_p95": pct(delivery, 95),
        "matched": len(admission),
        "edge_in_p50": pct(edge_in, 50),
        "edge_in_p95": pct(edge_in, 95),
        "actor_path_p50": pct(actor_path, 50),
        "actor_path_p95": pct(actor_path, 95),
        "gw_ttft_p50": pct([r["gw_ttft_ms"] for r in ok if r.get("gw_ttft_ms") is not None], 50),
        "gw_queue_p95": pct([r["gw_queue_ms"] for r in ok if r.get("gw_queue_ms") is not None], 95),
        "tokens": sum(r["ntok"] for r in recs),
        "wall_s": result["wall_s"],
        "loadgen_cpu_s": result["loadgen_cpu_s"],
        "error_details": sorted({str(r.get("detail"))[:160] for r in recs if not r["ok"] and r.get("detail")})[:3],
    }


class Bench:
    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.sim: Sim | None = None
        self.sluice: Sluice | None = None
        self.sluice_prod: Sluice | None = None
        self.litellm: LiteLLM | None = None
        self.sampler: MemSampler | None = None
        self.results: dict = {"meta": {}, "streams": [], "sustain": [], "cancel": [], "burst": [], "idle": {}}

    # --- lifecycle
    def start(self) -> None:
        soft, hard = __import__("resource").getrlimit(__import__("resource").RLIMIT_NOFILE)
        if soft < min(hard, 16384):
            __import__("resource").setrlimit(__import__("resource").RLIMIT_NOFILE, (min(hard, 16384), hard))
        log("starting the simulated provider")
        self.sim = Sim()
        self.sim.configure(ttft_ms=SIM_TTFT_MS, token_interval_ms=SIM_INTERVAL_MS, tokens=SIM_TOKENS)
        log(f"sim on {self.sim.url} (ttft {SIM_TTFT_MS} ms, a token every {SIM_INTERVAL_MS} ms, {SIM_TOKENS} tokens)")
        log("starting sluice (generous pacer: RPS=1000 BURST=1000 CONCURRENCY=1000)")
        self.sluice = Sluice("sluice", self.sim.url, "1000", "1000", "1000").start()
        log(f"sluice on {self.sluice.gw.url} ({len(self.sluice.pids)} processes)")
        log("starting LiteLLM proxy (--num_workers 1)")
        self.litellm = LiteLLM(self.sim.url).start()
        log(f"LiteLLM on http://127.0.0.1:{self.litellm.port} ({len(self.litellm.pids)} processes)")
        self.sampler = MemSampler(
            {
                "sluice": lambda: self.sluice.pids if self.sluice else set(),
                "sluice_prod": lambda: self.sluice_prod.pids if self.sluice_prod else set(),
                "litellm": lambda: self.litellm.pids if self.litellm else set(),
                "sim": lambda: proc_tree(self.sim.proc.pid) if self.sim else set(),
            }
        )
        self.sampler.start()

    def stop(self) -> None:
        if self.sampler:
            self.sampler.stop_event.set()
        for proc in list(LOADGENS):
            if proc.poll() is None:
                proc.kill()
        for name, thing in (
            ("sluice (production pacer)", self.sluice_prod),
            ("sluice", self.sluice),
            ("LiteLLM", self.litellm),
            ("sim", self.sim),
        ):
            if thing is None:
                continue
            try:
                log(f"stopping {name}")
                thing.stop()
            except Exception as exc:  # keep stopping the others
                log(f"  stopping {name} failed: {exc!r}")

    def targets(self) -> dict[str, dict]:
        return {"direct": direct_target(self.sim), "sluice": self.sluice.target(), "litellm": self.litellm.target()}

    def gateway_pids(self, name: str) -> set[int]:
        if name == "sluice":
            return self.sluice.pids
        if name == "litellm":
            return self.litellm.pids
        if name == "sluice_prod":
            return self.sluice_prod.pids
        return proc_tree(self.sim.proc.pid)

    def all_our_pids(self) -> set[int]:
        pids = proc_tree(self.sim.proc.pid)
        for thing in (self.sluice, self.sluice_prod, self.litellm):
            if thing is not None:
                pids |= thing.pids
        return pids

    def wait_quiet(self, label: str) -> None:
        """Before a round: wait (bounded) until other work on the machine uses < 0.5 core."""
        limit = self.args.quiet_wait
        waited, f = 0.0, foreign_cores(self.all_our_pids)
        while f > 0.5 and waited < limit:
            if waited == 0:
                log(f"  {label}: other processes use {f:.1f} cores; waiting up to {limit:.0f} s for a quieter machine")
            f = foreign_cores(self.all_our_pids, 2.0)
            waited += 2.0
        self.results.setdefault("quiet", []).append({"label": label, "waited_s": waited, "foreign_cores": f})

    @staticmethod
    def order(round_no: int, names=TARGETS) -> list[str]:
        k = round_no % len(names)
        return list(names[k:]) + list(names[:k])

    def stream_cell(
        self,
        name: str,
        target: dict,
        conc: int,
        per_worker: int,
        warmup: int,
        nonce: str,
        prompt: str = "",
        identical: bool = False,
        stagger: float | None = None,
        timeout_s: float = 30.0,
        cancel_after: int | None = None,
        breakdown: bool = False,
    ) -> dict:
        target = self.current_target(name, target)
        stream_s = (SIM_TTFT_MS + SIM_INTERVAL_MS * SIM_TOKENS) / 1000
        spec = {
            "target": target,
            "concurrency": conc,
            "per_worker": per_worker,
            "warmup": warmup,
            "stagger_s": stream_s if stagger is None else stagger,
            "timeout_s": timeout_s,
            "nonce": nonce,
            "prompt": prompt,
            "identical": identical,
            "cancel_after_tokens": cancel_after,
        }
        gw_key = name if name != "direct" else "sim"
        pids = self.gateway_pids(gw_key)
        sim_pids = proc_tree(self.sim.proc.pid)
        ours = self.all_our_pids()
        cpu0, sim0, ours0, sys0 = cpu_seconds(pids), cpu_seconds(sim_pids), cpu_seconds(ours), system_cpu_seconds()
        w0 = time.monotonic()
        calls0 = self.sim.stats()["calls"]
        load0 = os.getloadavg()[0]
        res = run_cell(spec, hard_timeout=timeout_s * per_worker + 120)
        pids |= self.gateway_pids(gw_key)
        cpu1, sim1, ours1, sys1 = cpu_seconds(pids), cpu_seconds(sim_pids), cpu_seconds(ours), system_cpu_seconds()
        w1 = time.monotonic()
        stats = self.sim.stats()
        upstream = {}
        if breakdown:
            for req in stats["requests"]:
                try:
                    upstream[req["body"]["messages"][-1]["content"].split("\n")[0]] = req
                except (KeyError, IndexError, TypeError, AttributeError):
                    pass
        s = summarize_streams(res, upstream)
        # CPU used on the machine by anything but our gateways, the simulator and the loadgen:
        # the other engineers' test runs. Cores, averaged over the cell.
        foreign = ((sys1 - sys0) - (ours1 - ours0) - res["loadgen_cpu_s"]) / max(w1 - w0, 1e-6)
        s.update(
            {
                "target": name,
                "conc": conc,
                "gw_cpu_s": cpu1 - cpu0,
                "sim_cpu_s": sim1 - sim0,
                "upstream_calls": stats["calls"] - calls0,
                "loadavg": load0,
                "foreign_cores": max(0.0, foreign),
            }
        )
        s["_records"] = res["records"]
        if name != "direct" and res["records"] and s["errors"] * 2 >= len(res["records"]):
            self.check_health(name, s, nonce)
        return s

    def current_target(self, name: str, fallback: dict) -> dict:
        """A gateway restarted after an incident listens on a new port: always ask the live one."""
        thing = {"sluice": self.sluice, "sluice_prod": self.sluice_prod, "litellm": self.litellm}.get(name)
        return thing.target() if thing is not None else fallback

    def check_health(self, name: str, cell: dict, nonce: str) -> None:
        """Half or more of a cell failed: probe the gateway with one plain request; if that fails
        too, record an incident (with the gateway's own state and log) and restart it."""
        target = self.current_target(name, {})
        probe = run_cell({"target": target, "concurrency": 1, "per_worker": 1, "timeout_s": 20, "nonce": "probe"}, 60)
        ok = probe["records"][0]["ok"]
        incident = {
            "target": name,
            "cell": nonce,
            "conc": cell["conc"],
            "errors": cell["errors"],
            "error_kinds": cell["error_kinds"],
            "details": cell["error_details"],
            "probe_ok": ok,
            "at": datetime.now(UTC).strftime("%H:%M:%S UTC"),
        }
        if name.startswith("sluice"):
            gw = (self.sluice if name == "sluice" else self.sluice_prod).gw
            try:
                status, _, body = request("GET", gw.url + "/api/metrics/performance?last_n=100", timeout=10)
                incident["metrics"] = json.loads(body) if status == 200 else body[:300].decode(errors="replace")
            except Exception as exc:
                incident["metrics"] = repr(exc)
            incident["log_tail"] = gw.output()[-1500:]
        else:
            incident["log_tail"] = self.litellm.output()[-1500:]
        log(
            f"  INCIDENT: {name} failed {cell['errors']} of its streams in cell {nonce} ({cell['error_kinds']}); "
            f"a probe request {'succeeded' if ok else 'failed too'}"
        )
        if not ok:
            log(f"  restarting {name} so the remaining measures can run (recorded in the report)")
            if name == "litellm":
                self.litellm.stop()
                self.litellm = LiteLLM(self.sim.url).start()
            else:
                old = self.sluice if name == "sluice" else self.sluice_prod
                old.stop()
                env = old.gw.env
                fresh = Sluice(
                    name, self.sim.url, env["SIMULATED_RPS"], env["SIMULATED_BURST"], env["SIMULATED_CONCURRENCY"]
                ).start()
                if name == "sluice":
                    self.sluice = fresh
                else:
                    self.sluice_prod = fresh
            incident["restarted"] = True
        self.results.setdefault("incidents", []).append(incident)

    def warmup(self) -> None:
        log("warm-up: 2 x 5 streams per target")
        for name, t in self.targets().items():
            for i in range(2):
                s = self.stream_cell(name, t, 5, 1, 0, f"warm{i}")
                if s["errors"]:
                    log(f"  warm-up {name}: {s['errors']} errors {s['error_kinds']} {s['error_details']}")
        trees = {name: self.gateway_pids(name) for name in GATEWAYS}
        before = {name: cpu_seconds(pids) for name, pids in trees.items()}
        time.sleep(IDLE_WINDOW_S)
        for name, pids in trees.items():
            self.results["idle"][name] = {
                "rss_kib": rss_kib(pids),
                "pss_kib": pss_kib(pids),
                "procs": len(pids),
                "cpu_cores": (cpu_seconds(pids) - before[name]) / IDLE_WINDOW_S,
            }
        log(
            "  idle: "
            + ", ".join(
                f"{n} {v['cpu_cores'] * 100:.1f} % of a core, RSS {v['rss_kib'] / 1024:.0f} MiB"
                for n, v in self.results["idle"].items()
            )
        )

    # --- measures 1, 2, 6
    def measure_streams(self) -> None:
        levels = [1, 10, 20, 50]
        rounds = self.args.rounds
        min_samples = 8 if self.quick else 20
        log(f"measures 1+2+6: concurrency {levels}, {rounds} rounds, targets interleaved")
        targets = self.targets()
        for rnd in range(rounds):
            for conc in levels:
                self.wait_quiet(f"streams round {rnd + 1} c={conc}")
                per_worker = 1 + max(2 if not self.quick else 1, math.ceil(min_samples / conc))
                line = []
                for name in self.order(rnd):
                    s = self.stream_cell(name, targets[name], conc, per_worker, 1, f"s{rnd}c{conc}", breakdown=True)
                    s["round"] = rnd
                    s.pop("_records")
                    self.results["streams"].append(s)
                    line.append(
                        f"{name} ttft p95 {s['ttft_p95']:.0f} ms gap p95 {f1(s['gap_p95'])} ms "
                        f"(adm {f0(s['admission_p50'])}/dlv {f0(s['delivery_p50'])}, other {s['foreign_cores']:.1f} cores)"
                        f"{' ERR ' + str(s['errors']) if s['errors'] else ''}"
                        if s["ttft_p95"] is not None
                        else f"{name} no data, {s['error_kinds']}"
                    )
                log(f"  round {rnd + 1}/{rounds} c={conc:<3d} " + " | ".join(line))

    # --- measure 3
    def measure_sustain(self) -> None:
        steps = [1, 5, 10, 20, 30, 50, 100] if self.quick else [1, 5, 10, 15, 20, 30, 40, 50, 75, 100, 150, 200, 300]
        rounds = 1 if self.quick else 2
        log(
            f"measure 3: sustained concurrency, steps {steps}, {rounds} rounds per step; a gateway stops at its "
            "first failing step (added TTFT p95 >= 100 ms or any error)"
        )
        targets = self.targets()
        active = list(GATEWAYS)
        for conc in steps:
            if not active:
                break
            cells: dict[str, list[dict]] = {n: [] for n in ["direct"] + active}
            for rnd in range(rounds):
                self.wait_quiet(f"sustain c={conc} round {rnd + 1}")
                for name in self.order(rnd, tuple(["direct"] + active)):
                    per_worker = 1 + max(2, math.ceil((8 if self.quick else 16) / conc))
                    s = self.stream_cell(name, targets[name], conc, per_worker, 1, f"u{rnd}c{conc}", timeout_s=30)
                    s.pop("_records")
                    s["round"] = rnd
                    cells[name].append(s)
            row = {"conc": conc, "direct": cells["direct"]}
            for name in active:
                added = [
                    g["ttft_p95"] - d["ttft_p95"] if g["ttft_p95"] is not None and d["ttft_p95"] is not None else None
                    for g, d in zip(cells[name], cells["direct"])
                ]
                errs = sum(c["errors"] for c in cells[name])
                a = med(added)
                passed = a is not None and a < 100 and errs == 0
                row[name] = {"cells": cells[name], "added_p95": a, "errors": errs, "pass": passed}
            self.results["sustain"].append(row)
            log(
                f"  c={conc:<3d} direct p95 {med(c['ttft_p95'] for c in cells['direct']):.0f} ms"
                f" (errors {sum(c['errors'] for c in cells['direct'])}) | "
                + " | ".join(
                    f"{n} added p95 {row[n]['added_p95'] if row[n]['added_p95'] is None else round(row[n]['added_p95'])}"
                    f" ms, errors {row[n]['errors']} -> {'pass' if row[n]['pass'] else 'FAIL'}"
                    for n in active
                )
            )
            active = [n for n in active if row[n]["pass"]]

    # --- measure 4
    def measure_cancel(self) -> None:
        n = 6 if self.quick else 10
        rounds = self.args.rounds
        log(f"measure 4: cancel latency, {n} sequential cancels per target per round, {rounds} rounds")
        targets = self.targets()
        prompt = "#sim tokens=250"  # a 5 s stream: a cancel that never reaches upstream is plain to see
        for rnd in range(rounds):
            for name in self.order(rnd):
                self.sim.wait_idle()
                s = self.stream_cell(
                    name,
                    targets[name],
                    1,
                    n,
                    0,
                    f"k{rnd}{name}",
                    prompt=prompt,
                    stagger=0,
                    timeout_s=30,
                    cancel_after=3,
                )
                recs = s.pop("_records")
                closes = {r["text"].split("\n")[0]: r["close_wall"] for r in recs if r.get("close_wall")}
                lat, missing, outcomes = [], 0, {}
                deadline = time.monotonic() + 12
                while True:
                    st = self.sim.stats()
                    calls = {}
                    for req in st["requests"]:
                        try:
                            text = req["body"]["messages"][-1]["content"].split("\n")[0]
                        except (KeyError, IndexError, TypeError, AttributeError):
                            continue
                        if text in closes:
                            calls[req["call_id"]] = (text, req.get("outcome"))
                    cancels = {c["call_id"]: c for c in st["cancellations"]}
                    done = all(outcome is not None for _, outcome in calls.values()) and len(calls) >= len(closes)
                    if done or time.monotonic() > deadline:
                        break
                    time.sleep(0.1)
                for cid, (text, outcome) in calls.items():
                    outcomes[outcome or "still_open"] = outcomes.get(outcome or "still_open", 0) + 1
                    if cid in cancels:
                        lat.append((cancels[cid]["observed_at"] - closes[text]) * 1000)
                missing = len(closes) - len(lat)
                row = {
                    "target": name,
                    "round": rnd,
                    "n": len(closes),
                    "latencies_ms": lat,
                    "p50": pct(lat, 50),
                    "p95": pct(lat, 95),
                    "not_cancelled": missing,
                    "upstream_outcomes": outcomes,
                    "client_errors": s["errors"],
                    "error_kinds": s["error_kinds"],
                }
                self.results["cancel"].append(row)
                log(
                    f"  round {rnd + 1}/{rounds} {name:8s} cancel p50 {f1(row['p50'])} ms p95 {f1(row['p95'])} ms; "
                    f"{missing} never cancelled; upstream outcomes {outcomes}"
                )
        self.sim.wait_idle(20)

    # --- measure 5
    def measure_burst(self) -> None:
        sizes = [50, 1000]
        rounds = {50: 1 if self.quick else 3, 1000: 1 if self.quick else 2}
        log(
            "measure 5: bursts of identical requests; starting a second sluice at production pacer settings "
            "(SIMULATED_RPS=1 SIMULATED_BURST=2 SIMULATED_CONCURRENCY=3)"
        )
        self.sluice_prod = Sluice("sluice_prod", self.sim.url, "1", "2", "3").start()
        targets = {
            "direct": direct_target(self.sim),
            "sluice_prod": self.sluice_prod.target(),
            "litellm": self.litellm.target(),
        }
        # warm the production sluice with one (distinct) request
        self.stream_cell("sluice_prod", targets["sluice_prod"], 1, 1, 0, "warmprod")
        for size in sizes:
            for rnd in range(rounds[size]):
                for name in self.order(rnd, ("direct", "sluice_prod", "litellm")):
                    self.sim.wait_idle(30)
                    time.sleep(1.0)  # let the production pacer's bucket refill (RPS=1)
                    s = self.stream_cell(
                        name,
                        targets[name],
                        size,
                        1,
                        0,
                        f"b{size}r{rnd}{secrets.token_hex(3)}",
                        identical=True,
                        stagger=0,
                        timeout_s=120,
                    )
                    s.pop("_records")
                    s.update({"size": size, "round": rnd})
                    self.results["burst"].append(s)
                    log(
                        f"  burst {size:4d} round {rnd + 1}/{rounds[size]} {name:11s}: upstream calls "
                        f"{s['upstream_calls']}, completed {s['ok']}/{size}, errors {s['errors']} {s['error_kinds']}, "
                        f"ttft p95 {s['ttft_p95'] if s['ttft_p95'] is None else round(s['ttft_p95'])} ms, "
                        f"wall {s['wall_s']:.1f} s"
                    )
        self.results["prod_pacer"] = self.sluice_prod.pacer

    # --- profile of sluice (py-spy)
    def profile_sluice(self, conc: int) -> None:
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not os.path.exists(spy):
            log("profile: py-spy not found (pip install py-spy into .venv to enable); skipped")
            return
        log(f"profile: sluice at {conc} streams, py-spy on each of its processes (not a measured cell)")
        pids = sorted(self.sluice.pids)
        roles = label_roles(spy, pids, self.sluice.gw.proc.pid)
        tmp = str(RESULTS / f"spy-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}")
        os.makedirs(tmp, exist_ok=True)
        duration = 12
        spies = {
            p: subprocess.Popen(
                [
                    spy,
                    "record",
                    "-p",
                    str(p),
                    "-d",
                    str(duration),
                    "-r",
                    "50",
                    "-f",
                    "raw",
                    "--nonblocking",
                    "-o",
                    os.path.join(tmp, f"{p}.txt"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )
            for p in pids
        }
        try:
            time.sleep(1.0)
            before = {p: cpu_seconds({p}) for p in pids}
            t0 = time.monotonic()
            per_worker = 1 + max(2, math.ceil((duration - 2) / 0.8))
            res = run_cell(
                {
                    "target": self.sluice.target(),
                    "concurrency": conc,
                    "per_worker": per_worker,
                    "warmup": 1,
                    "stagger_s": 0.8,
                    "timeout_s": 60,
                    "nonce": "prof",
                },
                300,
            )
            wall = time.monotonic() - t0
            cpu = {p: cpu_seconds({p}) - before[p] for p in pids}
            for sp in spies.values():
                try:
                    sp.wait(duration + 30)
                except subprocess.TimeoutExpired:
                    sp.kill()
        finally:
            for sp in spies.values():
                if sp.poll() is None:
                    sp.kill()
                    sp.wait()
        tokens = sum(r["ntok"] for r in res["records"])
        procs = []
        for p in pids:
            stacks = _read_spy(os.path.join(tmp, f"{p}.txt"))
            procs.append(
                {
                    "pid": p,
                    "role": roles.get(p) or _role_of(stacks),
                    "cpu_s": cpu[p],
                    "cores": cpu[p] / wall,
                    "top": _top_frames(stacks),
                }
            )
        procs.sort(key=lambda x: -x["cpu_s"])
        summary = summarize_streams(res)
        self.results["profile"] = {
            "conc": conc,
            "wall_s": wall,
            "tokens": tokens,
            "procs": procs,
            "raw": str(Path(tmp).relative_to(ROOT)),
            "ttft_p95": summary["ttft_p95"],
            "total_cpu_s": sum(cpu.values()),
        }
        for pr in procs[:6]:
            log(
                f"  {pr['role']:<24s} pid {pr['pid']:<7d} {pr['cores'] * 100:5.1f} % of a core; top: "
                + "; ".join(f"{f} {sh:.0f}%" for f, sh in pr["top"][:3])
            )
        self.cost_split(conc)

    def cost_split(self, conc: int) -> None:
        """Per-request vs per-token CPU: the same request rate with 30 tokens every 20 ms and with
        6 tokens every 100 ms (same stream duration), then CPU = a * requests + b * tokens."""
        log(f"cost split: {conc} streams, 30 tokens @ 20 ms vs 6 tokens @ 100 ms (same request rate)")
        configs = (("30 tokens @ 20 ms", 20, 30), ("6 tokens @ 100 ms", 100, 6))
        targets = {"sluice": self.sluice.target(), "litellm": self.litellm.target()}
        cells: dict = {}
        try:
            for rnd in range(2):
                for label, interval, tokens in configs:
                    self.sim.configure(ttft_ms=SIM_TTFT_MS, token_interval_ms=interval, tokens=tokens)
                    for name in self.order(rnd, GATEWAYS):
                        t0 = time.monotonic()
                        s = self.stream_cell(name, targets[name], conc, 3, 1, f"cs{rnd}{interval}", breakdown=True)
                        wall = time.monotonic() - t0
                        recs = s.pop("_records")
                        s.update({"requests": len(recs), "round": rnd, "config": label, "cell_wall_s": wall})
                        cells.setdefault((name, label), []).append(s)
                        log(
                            f"  {label:18s} {name:8s}: {s['gw_cpu_s'] / s['wall_s']:.2f} cores, TTFT p95 {f0(s['ttft_p95'])} ms, "
                            f"admission p50 {f0(s['admission_p50'])} ms, delivery p50 {f0(s['delivery_p50'])} ms"
                        )
        finally:
            self.sim.configure(ttft_ms=SIM_TTFT_MS, token_interval_ms=SIM_INTERVAL_MS, tokens=SIM_TOKENS)
        split = {}
        for name in GATEWAYS:
            rows = []
            for label, _, _ in configs:
                cs = cells.get((name, label), [])
                rows.append(
                    {
                        "config": label,
                        "cpu_s": med(c["gw_cpu_s"] for c in cs),
                        "requests": med(c["requests"] for c in cs),
                        "tokens": med(c["tokens"] for c in cs),
                        "ttft_p95": med(c["ttft_p95"] for c in cs),
                        "admission_p50": med(c["admission_p50"] for c in cs),
                        "delivery_p50": med(c["delivery_p50"] for c in cs),
                        "cores": med(c["gw_cpu_s"] / c["wall_s"] for c in cs),
                    }
                )
            (c1, r1, k1), (c2, r2, k2) = ((r["cpu_s"], r["requests"], r["tokens"]) for r in rows)
            det = r1 * k2 - r2 * k1
            per_req = (c1 * k2 - c2 * k1) / det if det else None
            per_tok = (r1 * c2 - r2 * c1) / det if det else None
            split[name] = {
                "rows": rows,
                "cpu_ms_per_request": per_req * 1000 if per_req is not None else None,
                "cpu_ms_per_token": per_tok * 1000 if per_tok is not None else None,
            }
            log(
                f"  {name}: ~{f1(split[name]['cpu_ms_per_request'])} ms CPU per request + "
                f"~{split[name]['cpu_ms_per_token']:.3f} ms CPU per token"
                if per_tok is not None
                else f"  {name}: -"
            )
        self.results["cost_split"] = {"conc": conc, "gateways": split}

    def run(self) -> None:
        a = self.args
        measures = set(a.measures.split(","))
        self.warmup()
        if "1" in measures:
            self.measure_streams()
        if "3" in measures:
            self.measure_sustain()
        if "4" in measures:
            self.measure_cancel()
        if "5" in measures:
            self.measure_burst()
        if a.profile:
            self.profile_sluice(a.profile)
        self.results["memory"] = {
            "peak_rss_kib": dict(self.sampler.peak_rss),
            "peak_pss_kib": dict(self.sampler.peak_pss),
            "procs": dict(self.sampler.nprocs),
        }


ROLE_MARKERS = (  # most specific first: a forked actor's stack still shows its creator's frames
    ("PoolRuntime", "pool + stream hub"),
    ("PoolActor", "pool + stream hub"),
    ("StreamHub", "pool + stream hub"),
    ("CoalescerActor", "coalescer"),
    ("CoalescerLogic", "coalescer"),
    ("PacerActor", "pacer"),
    ("PacerLogic", "pacer"),
    ("MetricsActor", "metrics"),
    ("MetricsLogic", "metrics"),
    ("ThreadStore", "threads store"),
    ("_serve_http", "edge (uvicorn + bridge)"),
    ("uvicorn", "edge (uvicorn + bridge)"),
    ("SupervisorActor", "supervisor or an idle actor"),
    ("Logger", "thespian logger"),
    ("Admin", "thespian admin"),
)


# Frames every sample of a process goes through (entry points, and the Supervisor frames a forked
# actor inherits): left out of the "hottest functions" column.
WRAPPER_FRAMES = (
    "start (system.py)",
    "HostActor.receiveMessage",
    "HostActor._on_bytes",
    "SupervisorActor.on_wire",
    "PoolRuntime._run",
    "RequestResponseCycle.run_asgi",
)


def label_roles(spy: str, pids, edge_pid: int) -> dict[int, str]:
    """pid -> role. A Thespian actor process still has, in its stack, the frame that forked it,
    whose locals name the actor class: `py-spy dump --locals` shows it (innermost first)."""
    names = {
        "PoolActor": "pool + stream hub",
        "CoalescerActor": "coalescer",
        "PacerActor": "pacer",
        "MetricsActor": "metrics",
        "ThreadStoreActor": "threads store",
        "SupervisorActor": "supervisor",
    }
    out = {}
    for p in pids:
        if p == edge_pid:
            out[p] = "edge (uvicorn + bridge)"
            continue
        try:
            dump = subprocess.run(
                [spy, "dump", "--pid", str(p), "--locals", "--nonblocking"], capture_output=True, text=True, timeout=20
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        m_ = re.search(r'"actors\.[a-z_]+\.([A-Za-z]+)"', dump)
        if m_:
            out[p] = names.get(m_.group(1), m_.group(1))
        elif "Logger" in dump or "logger" in dump.lower():
            out[p] = "thespian logger"
        elif "Admin" in dump:
            out[p] = "thespian admin"
    return out


def _read_spy(path: str) -> list[tuple[list[str], int]]:
    out = []
    try:
        for line in open(path):
            stack, _, n = line.rstrip().rpartition(" ")
            if stack:
                out.append((stack.split(";"), int(n)))
    except (OSError, ValueError):
        pass
    return out


def _role_of(stacks) -> str:
    text = " ".join({f for frames, _ in stacks for f in frames})
    for marker, role in ROLE_MARKERS:
        if marker in text:
            return role
    return "idle / unknown"


def _top_frames(stacks, n: int = 8) -> list[tuple[str, float]]:
    """Inclusive share of the samples per function of sluice's own code (actors/, edge/, protocols/)."""
    total = sum(c for _, c in stacks) or 1
    incl: dict[str, int] = {}
    for frames, count in stacks:
        seen = set()
        for f in frames:
            if any(d in f for d in ("actors/", "edge/", "protocols/")):
                name = f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].split("/")[-1] + ")" if " (" in f else f
                if name not in seen:
                    seen.add(name)
                    incl[name] = incl.get(name, 0) + count
    # Leave out the wrappers every sample goes through (actor entry points, the loop runner).
    ranked = [(k, v / total * 100) for k, v in sorted(incl.items(), key=lambda kv: -kv[1]) if v / total < 0.9]
    return ranked[:n]


def leak_check(cells=(20, 20, 50, 50, 50)) -> int:
    """Does sluice give its pacer leases back? After each cell the streams are all over, so the
    pacer's in_flight (from /api/admin/state) should be 0; the simulator's open streams too."""
    token = secrets.token_hex(16)
    sim = sluice = None
    try:
        sim = Sim()
        sim.configure(ttft_ms=SIM_TTFT_MS, token_interval_ms=SIM_INTERVAL_MS, tokens=SIM_TOKENS)
        sluice = Sluice("sluice", sim.url, "1000", "1000", "1000")
        sluice.gw.env["SLUICE_ADMIN_TOKEN"] = token
        sluice.start()
        leaked = 0
        for i, conc in enumerate(cells):
            res = run_cell(
                {
                    "target": sluice.target(),
                    "concurrency": conc,
                    "per_worker": 3,
                    "warmup": 1,
                    "stagger_s": 0.8,
                    "timeout_s": 30,
                    "nonce": f"leak{i}",
                },
                300,
            )
            time.sleep(1.5)
            status, _, body = request(
                "GET", sluice.gw.url + "/api/admin/state", headers={"Authorization": f"Bearer {token}"}, timeout=30
            )
            state = json.loads(body)["results"]
            pacer = next(v for k, v in state.items() if role_names.is_pacer(k))
            coalescers = {k: len(v.get("in_flight") or []) for k, v in state.items() if role_names.is_coalescer(k)}
            s = summarize_streams(res)
            leaked = pacer.get("in_flight", 0)
            log(
                f"cell {i + 1}: {conc} streams x 3, ok {s['ok']}/{s['n']}, errors {s['errors']}; afterwards: "
                f"simulator open streams {sim.stats()['streams_open']}, pacer in_flight {leaked}, "
                f"coalescer flights {coalescers}"
            )
        log("leases leaked" if leaked else "no lease leaked")
        return 1 if leaked else 0
    finally:
        for thing in (sluice, sim):
            if thing is not None:
                thing.stop()
