"""``make bench``: every benchmark, each printed side by side with its baseline in one run."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = (
    "bench_core",
    "bench_decoding",
    "bench_ingest",
    "bench_restore",
    "bench_forwarding",
    "bench_manifest",
    "bench_memory",
)


def main() -> None:
    names = sys.argv[1:] or list(BENCHMARKS)
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        print(f"\n=== {name} ===", flush=True)
        module.main()


if __name__ == "__main__":
    main()
