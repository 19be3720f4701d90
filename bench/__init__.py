"""Benchmarks for sluice: `python -m bench.run_all` (or `make bench`) runs them all and
writes docs/benchmarks.md. Each module also runs alone (`python -m bench.dataplane`,
`python -m bench.gateway`, `python -m bench.coalescing`) and prints/writes JSON."""
