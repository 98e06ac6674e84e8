"""Hand-run speed and memory benchmarks; results go to docs/benchmarks/."""
