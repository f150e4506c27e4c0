"""Benchmark scripts: each prints a table and writes JSON + Markdown under ``bench/results/``; never run as tests."""
