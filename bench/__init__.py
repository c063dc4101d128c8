"""Benchmarks of Bigpipe, each against a baseline measured in the same run: python -m bench."""
