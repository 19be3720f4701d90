"""Side-by-side benchmark: sluice vs LiteLLM proxy vs the direct (simulated) upstream.

    .venv/bin/python -m bench.litellm_compare           # the full run (~25-35 min on 2 cores)
    .venv/bin/python -m bench.litellm_compare --quick   # a short run (~6-8 min)

What it does, in order (progress is printed as it goes):
  1. installs LiteLLM proxy into its own virtualenv, bench/.peers/litellm-venv (git-ignored;
     a benchmark peer, not a sluice dependency), unless it is there already, and matplotlib
     into sluice's venv (`pip install -e '.[bench]'`) if it is missing;
  2. starts the simulated provider, sluice (run.py via sim.testing.Gateway, generous
     pacer) and LiteLLM (`litellm --config ... --num_workers 1`);
  3. drives the same load at each of them, interleaved (targets rotate order every round),
     with bench/litellm_loadgen.py in a process of its own whose CPU is measured;
  4. measures: added TTFT and inter-token gap vs concurrency, the highest sustained
     concurrency, cancel latency, bursts of identical requests (with a second sluice at
     production pacer settings), CPU per 1,000 streamed tokens and peak memory;
  5. writes docs/benchmarks-litellm.md, docs/img/litellm-*.png and the raw numbers to
     bench/results/ (git-ignored); and stops every process it started (also on Ctrl-C).

The hand-written analysis in docs/benchmarks-litellm.md between the markers
`<!-- analysis:begin -->` and `<!-- analysis:end -->` survives a re-run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.litellm.measure import Bench, leak_check
from bench.litellm.report import aggregate, compute_checks, machine_info, make_plots, read_analysis, versions, write_doc
from bench.litellm.run import (
    DEFAULT_LITELLM_SPEC,
    DOC,
    LITELLM_COMMAND_SHOWN,
    RESULTS,
    ROOT,
    ensure_litellm,
    ensure_matplotlib,
    log,
)

# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.litellm_compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short run (fewer rounds, samples and steps)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds for measures 1/2/4/6 (default 3, quick 2)")
    ap.add_argument("--measures", default="1,3,4,5", help="subset of measures to run: 1 (also 2 and 6), 3, 4, 5")
    ap.add_argument("--litellm-spec", default=DEFAULT_LITELLM_SPEC, help="pip requirement for the LiteLLM peer")
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=10.0,
        help="seconds to wait, at most, before a round for other work on the machine to calm down",
    )
    ap.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks-litellm.md and plots")
    ap.add_argument(
        "--profile",
        type=int,
        default=None,
        metavar="STREAMS",
        help="after the measures, profile sluice with py-spy at this many streams (default 50 in a full "
        "run when py-spy is installed; 0 = off)",
    )
    ap.add_argument(
        "--leak-check",
        action="store_true",
        help="only: drive one sluice with bursts of 50 distinct streams and print its pacer's in-flight "
        "leases after each (they should go back to 0 once the streams are over)",
    )
    ap.add_argument("--report-only", metavar="JSON", help="rewrite the doc and plots from a saved results file")
    args = ap.parse_args(argv)
    if args.rounds is None:
        args.rounds = 2 if args.quick else 3
    if args.profile is None:
        args.profile = 0 if args.quick else 50
    if args.report_only:
        saved = json.loads(Path(args.report_only).read_text())
        results = saved["results"]
        args.quick = results["meta"]["command"].find("--quick") >= 0
        m_ = re.search(r"--rounds (\d+)", results["meta"]["command"])
        args.rounds = int(m_.group(1)) if m_ else (2 if args.quick else 3)
        for row in results["streams"]:
            row.setdefault("round", 0)
        agg = aggregate(results)
        results["meta"]["checks"] = compute_checks(results, agg)
        results["meta"]["analysis"] = read_analysis()
        images = make_plots(results, agg)
        write_doc(results, agg, images, args)
        log(f"wrote {DOC.relative_to(ROOT)} and {', '.join(images)} from {args.report_only}")
        return 0

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    os.chdir(ROOT)
    if args.leak_check:
        return leak_check()
    log(f"bench.litellm_compare ({'quick' if args.quick else 'full'} run)")
    ensure_matplotlib()
    litellm_version = ensure_litellm(args.litellm_spec)
    bench = Bench(args)
    bench.results["meta"]["versions"] = versions(litellm_version)  # what is measured: the tree at the start
    started = time.time()
    try:
        bench.start()
        bench.results["meta"]["sluice_procs"] = len(bench.sluice.pids)
        bench.results["meta"]["litellm_procs"] = len(bench.litellm.pids)
        bench.results["meta"]["litellm_command"] = LITELLM_COMMAND_SHOWN
        bench.run()
    except KeyboardInterrupt:
        log("interrupted: stopping everything")
        bench.stop()
        RESULTS.mkdir(parents=True, exist_ok=True)
        partial = RESULTS / f"litellm_compare-interrupted-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
        bench.results["meta"]["interrupted"] = True
        partial.write_text(json.dumps({"results": bench.results}, indent=1, default=str))
        log(f"partial raw results: {partial.relative_to(ROOT)} (no report written)")
        return 130
    except BaseException:
        bench.stop()
        raise
    bench.stop()

    results = bench.results
    cells = results["streams"] + [
        c
        for row in results["sustain"]
        for k in row
        if k != "conc"
        for c in (row[k] if k == "direct" else row[k]["cells"])
    ]
    loads = [c["loadavg"] for c in cells + results["burst"]] or [0.0]
    utils = [c["loadgen_cpu_s"] / c["wall_s"] for c in cells + results["burst"] if c["wall_s"]] or [0.0]
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    RESULTS.mkdir(parents=True, exist_ok=True)
    results_file = RESULTS / f"litellm_compare-{stamp}.json"
    results["meta"].update(
        {
            "command": ".venv/bin/python -m bench.litellm_compare"
            + (" --quick" if args.quick else "")
            + (f" --rounds {args.rounds}" if args.rounds != (2 if args.quick else 3) else "")
            + (f" --measures {args.measures}" if args.measures != "1,3,4,5" else ""),
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "duration_min": (time.time() - started) / 60,
            "machine": machine_info(),
            "load_median": statistics.median(loads),
            "load_max": max(loads),
            "loadgen_util_max": max(utils),
            "results_file": str(results_file.relative_to(ROOT)),
            "litellm_spec": args.litellm_spec,
        }
    )
    agg = aggregate(results)
    results["meta"]["checks"] = compute_checks(results, agg)
    results_file.write_text(json.dumps({"results": results, "aggregate": agg}, indent=1, default=str))
    log(f"raw results: {results_file.relative_to(ROOT)}")
    if not args.no_doc:
        results["meta"]["analysis"] = read_analysis()
        images = make_plots(results, agg)
        write_doc(results, agg, images, args)
        log(f"wrote {DOC.relative_to(ROOT)} and {', '.join(images)}")
    for c in results["meta"]["checks"]:
        log(f"target {c['name']}: wanted {c['wanted']}; measured {c['measured']} -> {'met' if c['ok'] else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
