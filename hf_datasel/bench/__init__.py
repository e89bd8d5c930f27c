"""Benchmarks (not tests): `python -m hf_datasel.bench.<name>` prints timings and peak memory."""
