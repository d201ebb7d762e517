"""Benchmarks of the whole stack: `python -m bench [--quick]` (see bench/NOTES.md)."""
