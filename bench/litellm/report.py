"""Report: aggregate the results, plot them, check them against the targets and write
docs/benchmarks-litellm.md (keeping its hand-written analysis)."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from pathlib import Path

from bench.litellm.measure import WRAPPER_FRAMES, med
from bench.litellm.run import (
    DOC,
    GATEWAYS,
    IMG,
    LITELLM_COMMAND_SHOWN,
    LITELLM_VENV,
    RESULTS,
    ROOT,
    SIM_INTERVAL_MS,
    SIM_TOKENS,
    SIM_TTFT_MS,
    TARGETS,
    f0,
    f1,
    pip_version,
)

# ----------------------------------------------------------------------------- report


def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        mem = int(open("/proc/meminfo").readline().split()[1]) // 1024
    except (OSError, ValueError):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "mem_mib": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def versions(litellm_version: str) -> dict:
    import importlib.metadata as md

    out = {"litellm": litellm_version}
    for dist in ("thespian", "starlette", "uvicorn", "httpcore", "h2", "msgpack", "matplotlib"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "-"
    for dist in ("uvicorn", "httpx", "fastapi", "openai"):
        v = pip_version(LITELLM_VENV / "bin" / "python", dist)
        out[f"litellm venv: {dist}"] = v or "-"
    try:
        out["sluice commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip() + (
            " (+ uncommitted work in the tree)"
            if subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
            ).stdout.strip()
            else ""
        )
    except OSError:
        pass
    return out


def ratio(a, b) -> str:
    if a is None or b is None:
        return "–"
    if b <= 0:
        return "n/a (LiteLLM ≤ 0)" if a > 0 else "n/a"
    return f"{a / b:.2f}"


def aggregate(results: dict) -> dict:
    """Medians across rounds, pairing each gateway's cell with the direct cell of its round."""
    agg: dict = {"streams": {}, "cpu": {}}
    rows = results["streams"]
    levels = sorted({r["conc"] for r in rows})
    for conc in levels:
        by_round = {}
        for r in rows:
            if r["conc"] == conc:
                by_round.setdefault(r["round"], {})[r["target"]] = r
        for name in TARGETS:
            cells = [br[name] for br in by_round.values() if name in br]
            entry = {
                k: med(c.get(k) for c in cells)
                for k in (
                    "ttft_p50",
                    "ttft_p95",
                    "ttft_p99",
                    "gap_p50",
                    "gap_p95",
                    "admission_p50",
                    "admission_p95",
                    "delivery_p50",
                    "delivery_p95",
                    "gw_ttft_p50",
                    "gw_queue_p95",
                    "foreign_cores",
                    "edge_in_p50",
                    "edge_in_p95",
                    "actor_path_p50",
                    "actor_path_p95",
                )
            }
            entry["errors"] = sum(c["errors"] for c in cells)
            entry["n"] = sum(c["n"] for c in cells)
            entry["rounds"] = len(cells)
            entry["spread_p95"] = (
                (
                    min(c["ttft_p95"] for c in cells if c["ttft_p95"] is not None),
                    max(c["ttft_p95"] for c in cells if c["ttft_p95"] is not None),
                )
                if any(c["ttft_p95"] is not None for c in cells)
                else None
            )
            entry["loadgen_util"] = max(c["loadgen_cpu_s"] / c["wall_s"] for c in cells) if cells else None
            if name != "direct":
                for k in (
                    "ttft_p50",
                    "ttft_p95",
                    "ttft_p99",
                    "gap_p95",
                    "admission_p50",
                    "admission_p95",
                    "delivery_p50",
                    "delivery_p95",
                ):
                    diffs = [
                        br[name][k] - br["direct"][k]
                        for br in by_round.values()
                        if name in br
                        and "direct" in br
                        and br[name].get(k) is not None
                        and br["direct"].get(k) is not None
                    ]
                    entry["added_" + k] = med(diffs)
            tok = sum(c["tokens"] for c in cells)
            cpu = sum(c["gw_cpu_s"] for c in cells)
            entry["cpu_per_1k"] = cpu / tok * 1000 if tok else None
            entry["cpu_per_1k_rounds"] = [c["gw_cpu_s"] / c["tokens"] * 1000 for c in cells if c["tokens"]]
            entry["tokens"] = tok
            agg["streams"].setdefault(conc, {})[name] = entry
    return agg


def make_plots(results: dict, agg: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    IMG.mkdir(parents=True, exist_ok=True)
    made = []
    colors = {"direct": "#888888", "sluice": "#1f77b4", "litellm": "#d62728"}
    labels = {"direct": "direct (sim)", "sluice": "sluice", "litellm": "LiteLLM proxy"}
    levels = sorted(agg["streams"])
    if levels:
        fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), sharey=True)
        for ax, q in zip(axes, ("p50", "p95", "p99")):
            for name in TARGETS:
                ys = [agg["streams"][c][name]["ttft_" + q] for c in levels]
                ax.plot(levels, ys, marker="o", color=colors[name], label=labels[name])
            ax.set_title(f"TTFT {q} (median of rounds)")
            ax.set_xlabel("concurrent distinct streams")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(levels)
            ax.set_xticklabels([str(c) for c in levels])
            ax.grid(True, alpha=0.3)
        axes[0].set_ylabel("client-side TTFT, ms, log scale (sim TTFT = 200 ms)")
        from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

        for ax in axes:
            ax.yaxis.set_major_locator(FixedLocator([200, 300, 500, 1000, 2000, 5000, 10000, 20000]))
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(NullFormatter())
        axes[0].legend()
        fig.suptitle("Time to first token vs concurrency: direct upstream, sluice, LiteLLM proxy")
        fig.tight_layout()
        path = IMG / "litellm-ttft-vs-concurrency.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)

        fig, ax = plt.subplots(figsize=(8, 4.2))
        width = 0.38
        xs = range(len(levels))
        for i, name in enumerate(GATEWAYS):
            ys = [agg["streams"][c][name]["cpu_per_1k"] or 0 for c in levels]
            bars = ax.bar([x + (i - 0.5) * width for x in xs], ys, width, color=colors[name], label=labels[name])
            ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([f"{c} stream{'s' if c > 1 else ''}" for c in levels])
        ax.set_ylabel("gateway CPU seconds per 1,000 streamed tokens")
        ax.set_title("Gateway CPU cost per 1,000 tokens (all gateway processes; lower is better)")
        ax.legend()
        ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        path = IMG / "litellm-cpu-per-1k-tokens.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    if results["sustain"]:
        fig, ax = plt.subplots(figsize=(8, 4.2))
        for name in GATEWAYS:
            pts = [
                (row["conc"], row[name]["added_p95"])
                for row in results["sustain"]
                if name in row and row[name]["added_p95"] is not None
            ]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colors[name], label=labels[name])
                for row in results["sustain"]:
                    if name in row and row[name]["errors"]:
                        ax.annotate(
                            f"{row[name]['errors']} err",
                            (row["conc"], row[name]["added_p95"] or 0),
                            fontsize=8,
                            color=colors[name],
                        )
        ax.axhline(100, color="black", linestyle="--", linewidth=1, label="100 ms limit")
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=10)
        steps = [row["conc"] for row in results["sustain"]]
        ax.set_xticks(steps)
        ax.set_xticklabels([str(s) for s in steps])
        ax.set_xlabel("concurrent distinct streams")
        ax.set_ylabel("added TTFT p95 vs direct, ms")
        ax.set_title("Sustained concurrency: added TTFT p95 per step")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = IMG / "litellm-sustained.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    return [str(p.relative_to(ROOT / "docs")) for p in made]


def sustained_level(results: dict, name: str) -> tuple[int | None, str]:
    best, note = None, ""
    for row in results["sustain"]:
        if name not in row:
            break
        if row[name]["pass"]:
            best = row["conc"]
        else:
            note = f"fails at {row['conc']}: added p95 {f0(row[name]['added_p95'])} ms, {row[name]['errors']} errors"
            break
    else:
        if results["sustain"]:
            note = f"passed every step up to {results['sustain'][-1]['conc']} (the test's ceiling)"
    return best, note


def write_doc(results: dict, agg: dict, images: list[str], args) -> None:
    """Write docs/benchmarks-litellm.md: one function per section, in the order they appear
    (a section whose measure did not run writes nothing)."""
    meta = results["meta"]
    sections = (
        section_title(meta, args),
        section_setup(meta, args),
        section_ttft_vs_concurrency(agg),
        section_where_ttft_goes(agg),
        section_inter_token_gap(agg),
        section_sustained_concurrency(results, args),
        section_cancel_latency(results),
        section_bursts(results),
        section_cpu_and_memory(results, agg),
        section_profile(results),
        section_cost_split(results),
        section_run_to_run_noise(meta),
        section_incidents(results),
        section_targets(meta),
        section_analysis(meta),
        section_reproduce(meta),
    )
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n".join(line for lines in sections for line in lines) + "\n")


def section_title(meta: dict, args) -> list[str]:
    return [
        "# sluice vs LiteLLM proxy vs the direct upstream",
        "",
        f"Generated by `{meta['command']}` on {meta['date']} ({'quick run' if args.quick else 'full run'}, "
        f"{meta['duration_min']:.1f} min). Raw numbers: `{meta['results_file']}` (git-ignored).",
        "",
    ]


def section_setup(meta: dict, args) -> list[str]:
    m = meta["machine"]
    return [
        "## Setup",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['mem_mib']} MiB RAM, Linux {m['kernel']}, "
        f"Python {m['python']}. **Shared**: other engineers ran test suites on the same 2 cores during the run "
        f"(1-min load average seen at cell starts: median {meta['load_median']:.2f}, max {meta['load_max']:.2f}).",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
        f"- Upstream: the simulated provider (`sim/provider.py`), one process, TTFT {SIM_TTFT_MS} ms, one token "
        f"every {SIM_INTERVAL_MS} ms, {SIM_TOKENS} tokens per answer (set by `POST /config`; the cancel test asks "
        "for 250 tokens with `#sim tokens=250`).",
        f"- sluice: `run.py` via `sim.testing.Gateway`, `SIMULATED_BASE_URL=<sim>` (sluice speaks h2c to it), "
        f"generous pacer `SIMULATED_RPS=1000 SIMULATED_BURST=1000 SIMULATED_CONCURRENCY=1000` for the "
        f"distinct-stream measures; a second sluice with the production pacer `SIMULATED_RPS=1 SIMULATED_BURST=2 "
        f"SIMULATED_CONCURRENCY=3` for the bursts. Clients use `POST /api/chat` (sluice's SSE). "
        f"{meta['sluice_procs']} processes (Thespian actors + edge).",
        f"- LiteLLM: `{LITELLM_COMMAND_SHOWN}`, model `openai/sim-1` with `api_base=<sim>/v1`, "
        "`num_retries: 0`, a random 32-hex `master_key`; everything else as it comes (including its access log). "
        "Clients use `POST /v1/chat/completions` with `stream: true`. Run with a scrubbed environment "
        f"(own HOME, `LITELLM_LOCAL_MODEL_COST_MAP=True`). {meta['litellm_procs']} process(es).",
        "- Direct: the same requests straight to the simulator's `/v1/chat/completions` — the baseline that "
        '"added" figures subtract (per round, then the median over rounds).',
        "- Load generator: `bench/litellm_loadgen.py`, a process of its own per cell: asyncio streams, one "
        "HTTP/1.1 connection per request, incremental chunked decoding and the project's SSE parser; TTFT = "
        "request start to the first content token as read by the client; inter-token gap = time between "
        "consecutive tokens of a stream (tokens merged into one delta share a time stamp). Each worker's first "
        "stream is a ramp-up and left out of the percentiles; workers start spread over one stream's duration. "
        f"Its own CPU use peaked at {meta['loadgen_util_max'] * 100:.0f} % of one core in any cell "
        "(so it was not the bottleneck).",
        f"- Rounds: {args.rounds} for measures 1, 2, 4, 6 (targets interleaved and rotated every round: "
        "A B C, B C A, C A B); medians of the per-round figures are reported.",
        "",
    ]


def section_ttft_vs_concurrency(agg: dict) -> list[str]:
    """Measure 1."""
    levels = sorted(agg["streams"])
    if not levels:
        return []
    L: list[str] = []
    add = L.append
    add("## 1. Added TTFT vs concurrency (distinct streams)")
    add("")
    add('Client-side TTFT, ms. "added" = gateway − direct in the same round (median over rounds).')
    add("")
    add(
        "| streams | direct p50 / p95 / p99 | sluice added p50 / p95 / p99 | LiteLLM added p50 / p95 / p99 "
        "| p95 ratio sluice/LiteLLM | errors (direct / sluice / LiteLLM) |"
    )
    add("|---:|---|---|---|---:|---|")
    for c in levels:
        d, s, l_ = (agg["streams"][c][n] for n in TARGETS)
        add(
            f"| {c} | {f0(d['ttft_p50'])} / {f0(d['ttft_p95'])} / {f0(d['ttft_p99'])} "
            f"| {f1(s['added_ttft_p50'])} / {f1(s['added_ttft_p95'])} / {f1(s['added_ttft_p99'])} "
            f"| {f1(l_['added_ttft_p50'])} / {f1(l_['added_ttft_p95'])} / {f1(l_['added_ttft_p99'])} "
            f"| {ratio(s['added_ttft_p95'], l_['added_ttft_p95'])} "
            f"| {d['errors']} / {s['errors']} / {l_['errors']} |"
        )
    add("")
    add(
        "Absolute TTFT p95 per round (min–max across rounds, ms) — the noise: "
        + "; ".join(
            f"{c} streams: "
            + ", ".join(
                f"{n} {f0(agg['streams'][c][n]['spread_p95'][0])}–{f0(agg['streams'][c][n]['spread_p95'][1])}"
                for n in TARGETS
                if agg["streams"][c][n]["spread_p95"]
            )
            for c in levels
        )
        + "."
    )
    add("")
    add("![TTFT vs concurrency](img/litellm-ttft-vs-concurrency.png)")
    add("")
    return L


def section_where_ttft_goes(agg: dict) -> list[str]:
    """Measure 1, continued: the added TTFT split into admission and delivery."""
    levels = sorted(agg["streams"])
    if not levels:
        return []
    L: list[str] = []
    add = L.append
    add(
        "Where the added TTFT goes (each stream matched to its upstream call by a nonce in the prompt; "
        "the simulator stamps when it received the call and when it sent the first byte). *Admission* = "
        "client start → upstream receives the call; *delivery* = upstream's first byte → the client reads "
        "the first token. Both are shown as added over direct (median over rounds), p50 / p95, ms. "
        "sluice's own meta `ttft_ms` (measured at the first provider byte) is shown for comparison."
    )
    add("")
    add(
        "| streams | sluice admission | sluice delivery "
        "| sluice meta ttft_ms p50 | LiteLLM admission | LiteLLM delivery | other load on the machine "
        "(cores, median of cells) |"
    )
    add("|---:|---|---|---:|---|---|---:|")
    for c in levels:
        d, s, l_ = (agg["streams"][c][n] for n in TARGETS)
        add(
            f"| {c} | {f1(s.get('added_admission_p50'))} / {f1(s.get('added_admission_p95'))} "
            f"| {f1(s.get('added_delivery_p50'))} / {f1(s.get('added_delivery_p95'))} | {f0(s.get('gw_ttft_p50'))} "
            f"| {f1(l_.get('added_admission_p50'))} / {f1(l_.get('added_admission_p95'))} "
            f"| {f1(l_.get('added_delivery_p50'))} / {f1(l_.get('added_delivery_p95'))} "
            f"| {f1(med([d.get('foreign_cores'), s.get('foreign_cores'), l_.get('foreign_cores')]))} |"
        )
    add("")
    return L


def section_inter_token_gap(agg: dict) -> list[str]:
    """Measure 2."""
    levels = sorted(agg["streams"])
    if not levels:
        return []
    L = [
        "## 2. Added inter-token gap p95 (sim sends a token every 20 ms)",
        "",
        "| streams | direct gap p50 / p95 | sluice gap p50 / p95 (added p95) | LiteLLM gap p50 / p95 (added p95) |",
        "|---:|---|---|---|",
    ]
    for c in levels:
        d, s, l_ = (agg["streams"][c][n] for n in TARGETS)
        L.append(
            f"| {c} | {f1(d['gap_p50'])} / {f1(d['gap_p95'])} | {f1(s['gap_p50'])} / {f1(s['gap_p95'])} "
            f"({f1(s['added_gap_p95'])}) | {f1(l_['gap_p50'])} / {f1(l_['gap_p95'])} ({f1(l_['added_gap_p95'])}) |"
        )
    L.append("")
    return L


def section_sustained_concurrency(results: dict, args) -> list[str]:
    """Measure 3."""
    if not results["sustain"]:
        return []
    L: list[str] = []
    add = L.append
    add("## 3. Highest sustained concurrency (added TTFT p95 < 100 ms and 0 errors)")
    add("")
    add(
        "Each step: every worker runs 1 ramp-up + max(2, ⌈16/streams⌉) measured streams (8 in a quick run); "
        f"{'1 round' if args.quick else '2 rounds'} per step (median added p95, errors summed); "
        "a gateway stops at its first failing step."
    )
    add("")
    add("| streams | direct TTFT p95 | sluice added p95 / errors | LiteLLM added p95 / errors |")
    add("|---:|---:|---|---|")
    for row in results["sustain"]:
        cells = []
        for n in GATEWAYS:
            if n in row:
                cells.append(f"{f0(row[n]['added_p95'])} ms / {row[n]['errors']} {'✅' if row[n]['pass'] else '❌'}")
            else:
                cells.append("(stopped)")
        add(f"| {row['conc']} | {f0(med(c['ttft_p95'] for c in row['direct']))} ms | " + " | ".join(cells) + " |")
    add("")
    s_best, s_note = sustained_level(results, "sluice")
    l_best, l_note = sustained_level(results, "litellm")
    add(f"- sluice sustains **{s_best if s_best else '< ' + str(results['sustain'][0]['conc'])}** streams ({s_note}).")
    add(f"- LiteLLM sustains **{l_best if l_best else '< ' + str(results['sustain'][0]['conc'])}** streams ({l_note}).")
    if s_best and l_best:
        add(
            f"- Ratio sluice/LiteLLM: **{s_best / l_best:.1f}×**"
            + (" (a lower bound: sluice passed the test's ceiling)" if "ceiling" in s_note else "")
            + "."
        )
    add("")
    add("![Sustained concurrency](img/litellm-sustained.png)")
    add("")
    return L


def section_cancel_latency(results: dict) -> list[str]:
    """Measure 4."""
    if not results["cancel"]:
        return []
    L: list[str] = []
    add = L.append
    add("## 4. Cancel latency (client disconnect → upstream sees the cancel)")
    add("")
    add(
        "Sequential streams of 250 tokens; the client aborts its TCP connection after the 3rd token; "
        "latency = the simulator's `observed_at` (from `/stats` `cancellations`) − the client's close time."
    )
    add("")
    add("| target | cancels | p50 ms | p95 ms | upstream never cancelled | upstream outcomes |")
    add("|---|---:|---:|---:|---:|---|")
    for name in TARGETS:
        rows = [r for r in results["cancel"] if r["target"] == name]
        if not rows:
            continue
        outcomes: dict = {}
        for r in rows:
            for k, v in r["upstream_outcomes"].items():
                outcomes[k] = outcomes.get(k, 0) + v
        add(
            f"| {name} | {sum(r['n'] for r in rows)} | {f1(med(r['p50'] for r in rows))} "
            f"| {f1(med(r['p95'] for r in rows))} | {sum(r['not_cancelled'] for r in rows)} "
            f"| {', '.join(f'{k}: {v}' for k, v in sorted(outcomes.items()))} |"
        )
    add("")
    return L


def section_bursts(results: dict) -> list[str]:
    """Measure 5."""
    if not results["burst"]:
        return []
    L: list[str] = []
    add = L.append
    add("## 5. Bursts of identical requests")
    add("")
    add(
        f"All requests of a burst are sent at once with the same prompt. sluice runs its production pacer "
        f"({results.get('prod_pacer')}); LiteLLM runs as it comes. Upstream calls are counted by the "
        "simulator. Medians over rounds (rounds listed)."
    )
    add("")
    add("| burst | target | rounds | upstream calls | completed | errors | TTFT p95 ms | wall s |")
    add("|---:|---|---:|---:|---:|---|---:|---:|")
    for size in sorted({b["size"] for b in results["burst"]}):
        for name in ("direct", "sluice_prod", "litellm"):
            rows = [b for b in results["burst"] if b["size"] == size and b["target"] == name]
            if not rows:
                continue
            kinds: dict = {}
            for b in rows:
                for k, v in b["error_kinds"].items():
                    kinds[k] = kinds.get(k, 0) + v
            label = {"sluice_prod": "sluice (prod pacer)", "litellm": "LiteLLM", "direct": "direct"}[name]
            add(
                f"| {size} | {label} | {len(rows)} | {' / '.join(str(b['upstream_calls']) for b in rows)} "
                f"| {' / '.join(str(b['ok']) for b in rows)} "
                f"| {sum(b['errors'] for b in rows)}{' ' + str(kinds) if kinds else ''} "
                f"| {f0(med(b['ttft_p95'] for b in rows))} | {f1(med(b['wall_s'] for b in rows))} |"
            )
    add("")
    return L


def section_cpu_and_memory(results: dict, agg: dict) -> list[str]:
    """Measure 6: CPU per 1k tokens from the measure-1 cells, memory, idle CPU."""
    levels = sorted(agg["streams"])
    if not levels:
        return []
    L: list[str] = []
    add = L.append
    add("## 6. CPU per 1,000 streamed tokens and memory")
    add("")
    add(
        "CPU = utime+stime summed over every process of the gateway's tree (`/proc/<pid>/stat`) across the "
        "measure-1 cells, divided by the tokens the clients received. The simulator's own CPU is shown for "
        "scale (the cost of producing the tokens)."
    )
    add("")
    add("| streams | sluice CPU s / 1k tokens | LiteLLM CPU s / 1k tokens | ratio sluice/LiteLLM | sim (upstream) |")
    add("|---:|---:|---:|---:|---:|")
    for c in levels:
        s, l_, d = (agg["streams"][c][n] for n in ("sluice", "litellm", "direct"))
        add(
            f"| {c} | {s['cpu_per_1k']:.3f} | {l_['cpu_per_1k']:.3f} | {ratio(s['cpu_per_1k'], l_['cpu_per_1k'])} "
            f"| {d['cpu_per_1k']:.3f} |"
        )
    add("")
    mem = results.get("memory", {})
    idle = results.get("idle", {})
    add("| gateway | processes | idle RSS MiB (sum) | peak RSS MiB (sum, sampled every 0.25 s) | peak PSS MiB |")
    add("|---|---:|---:|---:|---:|")
    for name, label in (
        ("sluice", "sluice"),
        ("sluice_prod", "sluice (prod pacer, bursts only)"),
        ("litellm", "LiteLLM"),
    ):
        if name not in mem.get("peak_rss_kib", {}):
            continue
        i = idle.get(name, {})
        add(
            f"| {label} | {mem['procs'].get(name, '–')} | {f0(i.get('rss_kib', 0) / 1024) if i else '–'} "
            f"| {mem['peak_rss_kib'][name] / 1024:.0f} | {mem['peak_pss_kib'].get(name, 0) / 1024:.0f} |"
        )
    add("")
    add(
        "RSS summed over processes counts pages shared between forked processes once per process; PSS "
        "splits them, so it is the fairer figure for sluice's many processes."
    )
    add("")
    if any("cpu_cores" in v for v in idle.values()):
        add(
            "Idle CPU (no traffic, measured over 5 s after the warm-up): "
            + ", ".join(
                f"{ {'sluice': 'sluice', 'litellm': 'LiteLLM'}.get(n, n) } {v['cpu_cores'] * 100:.1f} % of a core"
                for n, v in idle.items()
                if "cpu_cores" in v
            )
            + ". This floor is included in the per-token figures above and dominates them at 1 stream."
        )
        add("")
    add("![CPU per 1k tokens](img/litellm-cpu-per-1k-tokens.png)")
    add("")
    return L


def section_profile(results: dict) -> list[str]:
    prof = results.get("profile")
    if not prof:
        return []
    L: list[str] = []
    add = L.append
    add(f"## Profile of sluice at {prof['conc']} streams (py-spy, not a measured cell)")
    add("")
    add(
        f"{prof['tokens']} tokens in {prof['wall_s']:.1f} s; sluice used {prof['total_cpu_s']:.1f} CPU s "
        f"({prof['total_cpu_s'] / prof['wall_s']:.2f} cores, {prof['total_cpu_s'] / max(prof['tokens'], 1) * 1000:.2f} "
        f"s per 1k tokens; py-spy's sampling adds some); client TTFT p95 {f0(prof['ttft_p95'])} ms. Per process "
        "(role recognised from its stacks), with the functions of sluice's own code that were on the stack "
        f"most often (inclusive share of that process's samples; raw stacks in `{prof.get('raw', '')}`, "
        "git-ignored):"
    )
    add("")
    add("| role | pid | CPU (% of a core) | hottest sluice functions (inclusive) |")
    add("|---|---:|---:|---|")
    for pr in prof["procs"]:
        if pr["cpu_s"] < 0.05 * prof["wall_s"] * 0.1:
            continue
        top = [(f, sh) for f, sh in pr["top"] if not any(w in f for w in WRAPPER_FRAMES)]
        add(
            f"| {pr['role']} | {pr['pid']} | {pr['cores'] * 100:.1f} | "
            + "; ".join(f"`{f}` {sh:.0f}%" for f, sh in top[:5])
            + " |"
        )
    add("")
    return L


def section_cost_split(results: dict) -> list[str]:
    """Per-request vs per-token CPU cost, solved from two answer shapes at one request rate."""
    split = results.get("cost_split")
    if not split:
        return []
    L: list[str] = []
    add = L.append
    add(f"### Per-request vs per-token cost ({split['conc']} streams)")
    add("")
    add(
        "The same request rate twice: answers of 30 tokens one every 20 ms, and of 6 tokens one every 100 ms "
        "(both streams last ~0.8 s), medians of 2 interleaved rounds; gateway CPU = a × requests + b × tokens "
        "solved from the two."
    )
    add("")
    add("| gateway | answer shape | gateway CPU (cores) | TTFT p95 ms | admission p50 (abs) | delivery p50 (abs) |")
    add("|---|---|---:|---:|---:|---:|")
    for name in GATEWAYS:
        g = split["gateways"].get(name)
        if not g:
            continue
        for r in g["rows"]:
            add(
                f"| {name} | {r['config']} | {f1(r['cores'])} | {f0(r['ttft_p95'])} | {f1(r['admission_p50'])} "
                f"| {f1(r['delivery_p50'])} |"
            )
    add("")
    add("| gateway | CPU per request (ms) | CPU per token (ms) |")
    add("|---|---:|---:|")
    for name in GATEWAYS:
        g = split["gateways"].get(name)
        if g:
            per_tok = g["cpu_ms_per_token"]
            add(f"| {name} | {f1(g['cpu_ms_per_request'])} | {'–' if per_tok is None else format(per_tok, '.3f')} |")
    add("")
    return L


def section_run_to_run_noise(meta: dict) -> list[str]:
    """Headline figures of every full run saved in bench/results/."""
    history = previous_runs(meta.get("results_file"))
    if not history:
        return []
    L = [
        "## Run-to-run noise (every full run saved in bench/results/ on this machine)",
        "",
        "| run (UTC) | sluice commit | sluice / LiteLLM added TTFT p95 @ 20 streams (ms) | sustained streams sluice / LiteLLM "
        "| sluice cancel p95 (ms) | 1,000-burst upstream calls (sluice) |",
        "|---|---|---|---|---:|---|",
    ]
    for h in history:
        L.append(
            f"| {h['date']}{' (this run)' if h['this'] else ''} | {h['commit']} | {f1(h['s20'])} / {f1(h['l20'])} "
            f"| {h['s_sus']} / {h['l_sus']} | {f1(h['cancel'])} | {h['burst']} |"
        )
    L.append("")
    return L


def section_incidents(results: dict) -> list[str]:
    incidents = results.get("incidents") or []
    L = ["## Incidents during this run", ""]
    if not incidents:
        L.append("None: no cell had half or more of its streams fail.")
    for inc in incidents:
        metrics = inc.get("metrics")
        extra = ""
        if isinstance(metrics, dict):
            extra = (
                f"; sluice's own metrics then: upstream_calls {metrics.get('upstream_calls')}, active_streams "
                f"{metrics.get('active_streams')}, error_rate {metrics.get('error_rate')}, latency p50 "
                f"{f0((metrics.get('latency_ms') or {}).get('p50'))} ms"
            )
        L.append(
            f"- {inc['at']}: **{inc['target']}** failed {inc['errors']} streams in cell `{inc['cell']}` "
            f"({inc['conc']} streams; {inc['error_kinds']}); a single probe request "
            f"{'succeeded' if inc['probe_ok'] else 'failed too, so it was restarted for the remaining measures'}"
            f"{extra}."
        )
    L.append("")
    return L


def section_targets(meta: dict) -> list[str]:
    L = ["## Targets (this run)", "", "| target | wanted | measured | verdict |", "|---|---|---|---|"]
    for c in meta.get("checks", []):
        L.append(f"| {c['name']} | {c['wanted']} | {c['measured']} | {'✅ met' if c['ok'] else '❌ missed'} |")
    L.append("")
    return L


def section_analysis(meta: dict) -> list[str]:
    """The hand-written analysis, kept between the markers when the benchmark re-runs (read_analysis)."""
    return [
        "<!-- analysis:begin -->",
        meta.get("analysis") or "## Analysis\n\n(Write the analysis here; it is kept when the benchmark re-runs.)",
        "<!-- analysis:end -->",
        "",
    ]


def section_reproduce(meta: dict) -> list[str]:
    return [
        "## Reproduce",
        "",
        "```",
        ".venv/bin/python -m bench.litellm_compare          # full run",
        ".venv/bin/python -m bench.litellm_compare --quick  # short run",
        "```",
        "",
        f"LiteLLM is installed from `{meta['litellm_spec']}` into `bench/.peers/litellm-venv` (git-ignored), "
        "pinned because litellm 1.82.7/1.82.8 on PyPI were a supply-chain compromise; override with "
        "`--litellm-spec`. The script refuses known-compromised versions and any unexpected `.pth` file in "
        "that venv.",
    ]


def previous_runs(this_file: str | None) -> list[dict]:
    rows = []
    for path in sorted(RESULTS.glob("litellm_compare-*.json")):
        try:
            saved = json.loads(path.read_text())
            res = saved["results"]
            if "--quick" in res["meta"].get("command", "") or "--measures" in res["meta"].get("command", ""):
                continue
            agg = aggregate(res)
            s20 = agg["streams"].get(20, {}).get("sluice", {}).get("added_ttft_p95")
            l20 = agg["streams"].get(20, {}).get("litellm", {}).get("added_ttft_p95")
            cancel = med(r["p95"] for r in res["cancel"] if r["target"] == "sluice")
            burst = "; ".join(
                str(b["upstream_calls"]) for b in res["burst"] if b["target"] == "sluice_prod" and b["size"] == 1000
            )
            commit = (
                res["meta"]
                .get("versions", {})
                .get("sluice commit", "–")
                .replace(" (+ uncommitted work in the tree)", "+")
            )
            rows.append(
                {
                    "date": res["meta"].get("date", path.stem),
                    "commit": commit,
                    "s20": s20,
                    "l20": l20,
                    "s_sus": sustained_level(res, "sluice")[0],
                    "l_sus": sustained_level(res, "litellm")[0],
                    "cancel": cancel,
                    "burst": burst or "–",
                    "this": this_file is not None and path.name == Path(this_file).name,
                }
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return rows


def compute_checks(results: dict, agg: dict) -> list[dict]:
    checks = []
    if 20 in agg["streams"]:
        s = agg["streams"][20]["sluice"]["added_ttft_p95"]
        l_ = agg["streams"][20]["litellm"]["added_ttft_p95"]
        ok = s is not None and l_ is not None and l_ > 0 and s <= l_ / 10
        checks.append(
            {
                "name": "added TTFT p95 at 20 streams",
                "wanted": "≤ 1/10 of LiteLLM's",
                "measured": f"sluice {f1(s)} ms vs LiteLLM {f1(l_)} ms (ratio {ratio(s, l_)})",
                "ok": ok,
            }
        )
    if results["sustain"]:
        sb, sn = sustained_level(results, "sluice")
        lb, ln = sustained_level(results, "litellm")
        ok = bool(sb) and bool(lb) and sb >= 3 * lb
        if sb and not lb:
            ok = True
        checks.append(
            {
                "name": "sustained concurrency",
                "wanted": "≥ 3× LiteLLM's",
                "measured": f"sluice {sb} ({sn}) vs LiteLLM {lb} ({ln})",
                "ok": ok,
            }
        )
    rows = [r for r in results["cancel"] if r["target"] == "sluice"]
    if rows:
        p95 = med(r["p95"] for r in rows)
        miss = sum(r["not_cancelled"] for r in rows)
        checks.append(
            {
                "name": "cancel p95",
                "wanted": "≤ 20 ms",
                "measured": f"{f1(p95)} ms ({miss} never cancelled)",
                "ok": p95 is not None and p95 <= 20 and miss == 0,
            }
        )
    rows = [b for b in results["burst"] if b["target"] == "sluice_prod" and b["size"] == 1000]
    if rows:
        ok = all(b["upstream_calls"] == 1 and b["errors"] == 0 for b in rows)
        checks.append(
            {
                "name": "1,000 identical burst",
                "wanted": "1 upstream call, 0 errors",
                "measured": "; ".join(f"{b['upstream_calls']} call(s), {b['errors']} errors" for b in rows),
                "ok": ok,
            }
        )
    return checks


def read_analysis() -> str | None:
    try:
        text = DOC.read_text()
    except OSError:
        return None
    m_ = re.search(r"<!-- analysis:begin -->\n(.*?)\n<!-- analysis:end -->", text, re.S)
    return m_.group(1) if m_ else None
