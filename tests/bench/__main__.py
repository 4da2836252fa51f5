"""Issue 16's six benchmarks in one command, each table written into docs/performance.md.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 .venv/bin/python -m tests.bench \
        [--write] [--only receive,decode,...] [--quick]

Runs receive, decode, preprocess, results, turnaround and sustained in turn, with each one's
defaults (``--quick``: fewer images, rounds and studies, for a look in about 3 minutes rather than
about 6), prints each table as it is measured and, with ``--write``, replaces its marked
section in docs/performance.md (date, commit and machine above the table). Run it with nothing
else busy on the machine: every figure is a ratio to a reference measured in the same run, but
a busy neighbour still skews them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from tests.bench.report import write_section

#: name -> (module, its arguments with --quick)
BENCHMARKS: dict[str, tuple[str, list[str]]] = {
    "receive": ("tests.bench.bench_receive", ["--images", "12", "--rounds", "1"]),
    "decode": ("tests.bench.bench_decode", ["--runs", "1"]),
    "preprocess": ("tests.bench.bench_preprocess", ["--runs", "1", "--model-runs", "2"]),
    "results": ("tests.bench.bench_results", ["--runs", "2", "--profile", "0"]),
    "turnaround": ("tests.bench.bench_turnaround", ["--rounds", "2", "--packages", "demo"]),
    "sustained": ("tests.bench.bench_sustained", ["--studies", "10"]),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench",
                                description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true",
                   help="replace each benchmark's section in docs/performance.md")
    p.add_argument("--only", default=",".join(BENCHMARKS),
                   help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    p.add_argument("--quick", action="store_true", help="smaller runs (not for the docs)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        p.error(f"--only: unknown benchmark {', '.join(unknown)}")
    for name in names:
        module_name, quick = BENCHMARKS[name]
        module = importlib.import_module(module_name)
        sub = argparse.ArgumentParser(prog=module_name)
        module.add_arguments(sub)
        bench_args = sub.parse_args(quick if args.quick else [])
        start = time.monotonic()
        table = module.run(bench_args)
        print(f"{table.text()}\n({time.monotonic() - start:.0f} s)\n", flush=True)
        if args.write:
            write_section(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
