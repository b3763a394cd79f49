"""Benchmarks of the relay, each printed side by side with a baseline."""
