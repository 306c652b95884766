"""`python -m bench` runs every benchmark; `python -m bench NAME [NAME ...]` runs those."""

from __future__ import annotations

import importlib
import sys
import time

from . import BENCHMARKS
from .common import report


def main(argv: list[str]) -> int:
    names = argv or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; expected one of: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    tables = []
    for name in names:
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        module = importlib.import_module(f"bench.{name}")
        result = report(name, module.run)
        tables.append(result["table"])
        print(f"   ({time.perf_counter() - t0:.0f} s)\n", flush=True)
    if len(names) > 1:
        print("== all tables\n")
        print("\n\n".join(tables))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
