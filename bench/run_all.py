"""Run every sluice benchmark and write docs/benchmarks.md.

    .venv/bin/python -m bench.run_all            # everything, ~20 minutes on 2 cores
    .venv/bin/python -m bench.run_all --quick    # smaller counts, ~6 minutes (smoke run)
    .venv/bin/python -m bench.run_all --render   # only rewrite the docs from bench/results/*.json
    make bench                                   # the same as the first line

Each benchmark runs in a child process of its own (`python -m bench.<name> --json
bench/results/<name>.json`), one after the other, never two at once; Ctrl-C stops the
running child (which cleans up its own processes) and then this one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from bench.common import ROOT, fmt, log, machine

RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
DATAPLANE_DOC = ROOT / "docs" / "dataplane.md"

FULL = {
    "dataplane": ["--rounds", "3", "--duration", "3", "--doc", "docs/dataplane.md"],
    "gateway": ["--rounds", "6", "--cancels", "30", "--starts", "5"],
    "coalescing": ["--burst", "1000", "--distinct", "200"],
    "trace": ["--levels", "1,20", "--streams", "40"],
    "profile": ["--seconds", "15"],
}
if shutil.which("py-spy", path=os.path.dirname(sys.executable)):
    FULL["profile"].append("--py-spy")
QUICK = {
    "dataplane": [
        "--rounds",
        "1",
        "--duration",
        "2",
        "--rates",
        "200,1000,2500,5000",
        "--flood",
        "a=1000,b=20000,c=20000",
    ],
    "gateway": ["--rounds", "2", "--cancels", "10", "--starts", "3"],
    "coalescing": ["--burst", "300", "--distinct", "20"],
    "trace": ["--levels", "1,20", "--streams", "20"],
    "profile": ["--seconds", "8"],
}
TIMEOUT_S = {"dataplane": 1200, "gateway": 1500, "coalescing": 1200, "trace": 600, "profile": 600}


def run_child(name: str, extra: list[str]) -> bool:
    out = RESULTS / f"{name}.json"
    cmd = [sys.executable, "-m", f"bench.{name}", "--json", str(out), *extra]
    log("running", " ".join(cmd[1:]))
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    try:
        code = proc.wait(TIMEOUT_S[name])
    except subprocess.TimeoutExpired:
        log(f"{name} took longer than {TIMEOUT_S[name]} s; stopping it")
        _stop(proc)
        return False
    except KeyboardInterrupt:
        _stop(proc)
        raise
    log(f"{name} finished with {code} in {time.monotonic() - t0:.0f} s")
    return code == 0


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT first (the child cleans up its processes), then SIGTERM, then SIGKILL."""
    for sig, wait in ((signal.SIGINT, 30), (signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def results_time() -> str:
    stamps = [p.stat().st_mtime for p in RESULTS.glob("*.json") if p.stem in FULL]
    if not stamps:
        return "no run yet"
    return f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(min(stamps)))}–{time.strftime('%H:%M %Z', time.localtime(max(stamps)))}"


# ======================================================================================
def litellm_section() -> list[str]:
    """The side-by-side against LiteLLM proxy has a report of its own; here, every full run's
    headline figures (from bench/results/litellm_compare-*.json) and where to read more."""
    from bench.litellm.report import previous_runs

    runs = previous_runs(None)
    lines = [
        "",
        "## Against LiteLLM proxy",
        "",
        "`.venv/bin/python -m bench.litellm_compare` (~12 min) drives the same load against the simulated provider "
        "directly, sluice and LiteLLM proxy (one worker), interleaved, and writes "
        "[benchmarks-litellm.md](benchmarks-litellm.md): every measure, ratios, plots and the analysis. Targets: added "
        "TTFT p95 at 20 streams ≤ 1/10 of LiteLLM's, sustained concurrency ≥ 3× LiteLLM's, cancel p95 ≤ 20 ms, 1,000 "
        "identical requests → 1 upstream call and 0 errors.",
    ]
    if runs:
        lines += [
            "",
            "| full run (UTC) | sluice commit | added TTFT p95 @ 20 streams, sluice / LiteLLM (ms) | sustained streams "
            "sluice / LiteLLM | sluice cancel p95 (ms) | 1,000-burst upstream calls (sluice) |",
            "|---|---|---|---|---:|---|",
        ]
        for r in runs:
            lines.append(
                f"| {r['date']} | {r['commit']} | {fmt(r['s20'])} / {fmt(r['l20'])} | {r['s_sus']} / {r['l_sus']} "
                f"| {fmt(r['cancel'])} | {r['burst']} |"
            )
    return lines


def render(commands: dict, quick: bool) -> str:
    from bench import coalescing, dataplane, gateway

    dp, gw, co, tr, pr = (load(n) for n in ("dataplane", "gateway", "coalescing", "trace", "profile"))
    mach = (gw or co or dp or {}).get("machine") or machine()
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `python -m bench.run_all{' --quick' if quick else ''}` (also `make bench`) from results of {results_time()}. "
        "Every figure below comes from `bench/results/*.json` of that run; rerun the command to refresh them.",
        "",
        "## Machine",
        "",
        f"* {mach['nproc']} cores, {mach['cpu_model']}, {mach.get('mem_total_mib')} MiB RAM, Linux {mach['kernel']}",
        f"* Python {mach['python']}; " + ", ".join(f"{k} {v}" for k, v in mach["packages"].items() if v),
        "* git commit per benchmark (other engineers commit and edit the tree while this runs): "
        + ", ".join(
            f"{n} {r['machine']['git_commit']} (+{r['machine']['git_dirty_files']} modified files)"
            for n, r in (("dataplane", dp), ("gateway", gw), ("coalescing", co))
            if r and r.get("machine")
        ),
        f"* open files limit {mach['ulimit_nofile'][0]}",
        "* **The machine is shared**: other people's test suites ran during these measurements (load averages are "
        "recorded per benchmark below). Everything is therefore measured as a difference or ratio against a baseline "
        "taken in the same run, interleaved, with repeated rounds; medians are reported with their spread.",
        "",
        "## Commands",
        "",
        "```",
    ]
    for name, args in commands.items():
        lines.append(f".venv/bin/python -m bench.{name} --json bench/results/{name}.json {' '.join(args)}")
    lines += ["```", "", "## Targets", "", "| measure | value | target | verdict |", "|---|---:|---:|---|"]
    if gw:
        for v in gw["verdicts"]:
            digits = 2 if v["unit"] == "s" else 1
            lines.append(
                f"| {v['measure']} | {fmt(v['value'], digits)} {v['unit']} | ≤ {v['target']:g} {v['unit']} | **{v['verdict']}** |"
            )
    if co:
        for v in co["verdicts"]:
            value = fmt(v["value"]) if isinstance(v["value"], float) else v["value"]
            if "TTFT" in v["measure"]:
                value = f"{value} ms"
            lines.append(f"| {v['measure']} | {value} | {v['target']} | **{v['verdict']}** |")
    if dp:
        hs = dp["summary"]["highest_sustained"]
        lines.append(
            f"| data plane: hub stream sustains 5,000 deltas/s (this benchmark's own criterion) | highest sustained {fmt(hs.get('c'), 0)}/s | ≥ 5000/s | "
            f"**{'PASS' if (hs.get('c') or 0) >= 5000 else 'MISS'}** |"
        )

    lines += litellm_section()
    from bench.cores import kept_section

    cores = kept_section()  # bench.cores writes its own section; a re-render keeps it as it stands
    if cores:
        lines += ["", cores.rstrip("\n")]

    # --- data plane --------------------------------------------------------------------------
    if dp:
        lines += [
            "",
            "## 1. Data plane (Pool → edge)",
            "",
            f"Full method and conclusion: [dataplane.md](dataplane.md). Load average {dp['machine']['loadavg_at_start'][0]:.2f} at start, "
            f"{dp.get('loadavg_at_end', [0])[0]:.2f} at end.",
            "",
            dataplane.render_markdown(dp),
            "",
            dataplane.conclusion(dp),
        ]

    # --- gateway --------------------------------------------------------------------------------
    if gw:
        k = gw["knobs"]
        lines += [
            "",
            "## 2. Gateway overhead (sluice vs the simulated provider called directly)",
            "",
            f"Same sim process for both targets; client HTTP/1.1 to both (sluice → sim is h2c). Distinct prompts, "
            f"`#sim ttft_ms={k['ttft_ms']} token_interval_ms={k['token_interval_ms']} tokens={k['tokens']}`. Closed loop, workers staggered; "
            f"blocks alternate direct/sluice (ABBA), {gw['params']['rounds']} blocks per target per level, and before each pair the run waits "
            f"(≤ 20 s) for the machine to be < {gw['params'].get('quiet_pct', 35):g} % busy. *Added* = sluice − direct per block pair, median over "
            "pairs (min–max in brackets); *pooled* = over all samples. *in* = client send → the sim receives the call; *out* = the sim's first "
            "byte → the client's first delta (client and sim wall clocks, same host). Server CPU: CPU-ms per stream of the sim process (direct) "
            "and of all sluice processes (sluice), from /proc.",
            "",
            gateway.render_markdown(gw),
            "",
            f"Idle memory (sum over run.py's process tree, {gw['idle_after_load']['count']} processes; Thespian's admin daemonizes into its own "
            f"session and is found by session id): fresh {gw['idle_fresh']['rss_mb']:.1f} MB RSS / {fmt(gw['idle_fresh']['pss_mb'])} MB PSS; "
            f"after the load {gw['idle_after_load']['rss_mb']:.1f} MB RSS / {fmt(gw['idle_after_load']['pss_mb'])} MB PSS. "
            "RSS counts the pages the forked processes share once per process; PSS splits them."
            + (
                f" Idle CPU of the whole tree over {gw['idle_cpu']['seconds']:.0f} s: {gw['idle_cpu']['pct_of_core']:.1f} % of a core."
                if gw.get("idle_cpu")
                else ""
            ),
            "",
            "| process | RSS MiB | PSS MiB |",
            "|---|---:|---:|",
        ]
        for p in gw["idle_after_load"]["processes"]:
            lines.append(
                f"| {p.get('role', '?')} ({p['pid']}) | {p['rss_kib'] / 1024:.1f} | {fmt((p['pss_kib'] or 0) / 1024)} |"
            )
        r = gw["ready"]
        lines += [
            "",
            f"Start → /readyz 200 (10 ms poll): with the sim given by URL median {r['sim_by_url']['median_s']:.3f} s "
            f"({', '.join(f'{x:.2f}' for x in r['sim_by_url']['samples_s'])}); a fresh `python run.py` that starts its own simulated provider "
            f"median {r['builtin_sim']['median_s']:.3f} s ({', '.join(f'{x:.2f}' for x in r['builtin_sim']['samples_s'])}).",
            f"Load average at start {gw['machine']['loadavg_at_start'][0]:.2f}, at end {gw.get('loadavg_at_end', [0])[0]:.2f}.",
        ]

    # --- coalescing -------------------------------------------------------------------------------
    if co:
        lines += [
            "",
            "## 3. Coalescing and pacing under bursts",
            "",
            "Identical burst: `#sim "
            + " ".join(f"{a}={b}" for a, b in co["burst_knobs"].items())
            + "`, one HTTP/1.1 connection per stream, "
            "all sent at once. Production pacer: "
            + " ".join(f"{a}={b}" for a, b in co["pacer_env"].items())
            + "; sim `#sim "
            + " ".join(f"{a}={b}" for a, b in co["paced_knobs"].items())
            + "` so RPS=1 alone paces the run "
            "(N distinct requests take ≈ N s; queue max and max wait raised so that nothing is refused).",
            "",
            coalescing.render_markdown(co),
            f"\nLoad average at start {co['machine']['loadavg_at_start'][0]:.2f}, at end {co.get('loadavg_at_end', [0])[0]:.2f}.",
        ]

    # --- attribution -----------------------------------------------------------------------------------
    if tr or pr:
        lines += ["", "## 4. Where the time goes (attribution)", ""]
    if pr:
        lines += [
            f"`bench.profile`: {pr['streams']} distinct streams at {pr['params']['concurrency']} concurrent for {pr['wall_s']:.0f} s through sluice; "
            "CPU per process from /proc (roles from the Supervisor's directory matched to listening sockets).",
            "",
            "| process | CPU s | % of a core | CPU ms per stream |",
            "|---|---:|---:|---:|",
        ]
        for p in pr["processes"]:
            lines.append(f"| {p['role']} | {p['cpu_s']:.2f} | {p['cpu_pct']:.0f} | {p['cpu_ms_per_stream']:.2f} |")
    if tr:
        lines += [
            "",
            "`bench.trace`: the same kind of load through a launcher that timestamps each stage (shims around product functions in the launcher "
            "only; the actors inherit them by fork). Leaders only, client-observed. Stages are consecutive; '(side)' rows overlap them.",
            "",
        ]
        levels = list(tr["levels"].keys())
        lines.append("| stage | " + " | ".join(f"c={lv} p50 / p95 ms" for lv in levels) + " |")
        lines.append("|---|" + "---:|" * len(levels))
        for i, row in enumerate(tr["levels"][levels[0]]):
            cells = []
            for lv in levels:
                r = tr["levels"][lv][i]
                cells.append(f"{fmt(r['p50_ms'], 2)} / {fmt(r['p95_ms'], 2)}")
            lines.append(f"| {row['stage']} | " + " | ".join(cells) + " |")
        if tr.get("cancel"):
            lines += [
                "",
                "Cancel path (client hangs up after the first delta; sequential):",
                "",
                "| stage | p50 / p95 ms |",
                "|---|---:|",
            ]
            for row in tr["cancel"]:
                lines.append(f"| {row['stage']} | {fmt(row['p50_ms'], 2)} / {fmt(row['p95_ms'], 2)} |")
    if pr and any(p.get("top_self") for p in pr["processes"]):
        lines += [
            "",
            "py-spy (`--gil --nonblocking`) on the busiest processes; each process's CPU ms per stream shared out by its samples "
            "(self = the function itself, inclusive = with its callees):",
            "",
        ]
        for p in pr["processes"][:4]:
            if not p.get("top_self") or p["role"] in ("load generator",):
                continue
            lines += [
                f"**{p['role']}** — {p['cpu_ms_per_stream']:.2f} CPU ms per stream, {p['samples']} samples",
                "",
                "| inclusive, sluice code | ms/stream | share |",
                "|---|---:|---:|",
            ]
            for f, _n, share, ms in p["top_inclusive_sluice"][:10]:
                lines.append(f"| `{f}` | {ms:.2f} | {share:.0f} % |")
            lines += ["", "| self | ms/stream | share |", "|---|---:|---:|"]
            for f, _n, share, ms in p["top_self"][:8]:
                lines.append(f"| `{f}` | {ms:.2f} | {share:.0f} % |")
            lines.append("")
    notes = ROOT / "bench" / "NOTES.md"
    if notes.exists():
        lines += ["", notes.read_text().strip()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--render", action="store_true", help="only write the docs from bench/results/*.json")
    parser.add_argument("--only", default="", help="comma-separated subset: dataplane,gateway,coalescing,trace,profile")
    args = parser.parse_args(argv)
    commands = QUICK if args.quick else FULL
    RESULTS.mkdir(parents=True, exist_ok=True)
    failed = []
    if not args.render:
        names = [n for n in commands if not args.only or n in args.only.split(",")]
        try:
            for name in names:
                if not run_child(name, commands[name]):
                    failed.append(name)
        except KeyboardInterrupt:
            log("interrupted; the docs are not rewritten")
            return 130
    DOC.write_text(render(commands, args.quick))
    log(f"wrote {DOC.relative_to(ROOT)}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
