"""Benchmarks (run from the repository root as `python -m bench.<name>`): `ab` is the one
tool for A/B runs of server variants; the other modules measure one thing each. Results
go to bench/results/ with the CPU recorded; bench/RESULTS.md shows today's numbers."""
