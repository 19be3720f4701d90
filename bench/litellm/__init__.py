"""The sluice-vs-LiteLLM comparison (`python -m bench.litellm_compare`), in three parts:
`run` installs the peers and starts/stops their processes, `measure` drives the load and
collects the figures, `report` turns them into docs/benchmarks-litellm.md and its plots."""
