"""Test time with and without the session capture cache (tests/capture_cache.py), measured in one run.

Runs pytest twice on the same test files, one process, no xdist, one thread: first with
SVDQ_TEST_CAPTURE_CACHE=0 (every compile captures afresh, as before the cache), then with the cache. Records
per run the wall time, the CPU seconds of pytest and its children, the pass/fail counts and the slowest tests
(`--durations`), with the machine, the load average and the commit (bench_common.machine).

    python tools/bench_suite_time.py tests/passes/test_presets_end_to_end.py tests/test_cli.py \\
        --out bench/results/suite-time-capture-cache.json
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench_common import machine, write_result

ROOT = Path(__file__).resolve().parents[1]
DURATION = re.compile(r"^([\d.]+)s (call|setup|teardown)\s+(\S+)$")
SUMMARY = re.compile(r"(\d+) (passed|failed|error|errors|skipped|deselected)")


def run(files: list[str], cache: bool, durations: int) -> dict:
    env = {**os.environ, "SVDQ_TEST_CAPTURE_CACHE": "1" if cache else "0", "OMP_NUM_THREADS": "1",
           "TRITON_INTERPRET": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", f"--durations={durations}",
                           *files], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    lines = done.stdout.splitlines()
    slowest = [{"seconds": float(m.group(1)), "when": m.group(2), "test": m.group(3)}
               for m in map(DURATION.match, lines) if m]
    counts = {kind: int(n) for n, kind in SUMMARY.findall(lines[-1] if lines else "")}
    if done.returncode not in (0, 1):
        print(done.stdout[-3000:], done.stderr[-3000:], sep="\n", file=sys.stderr)
    return {"capture_cache": cache, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "returncode": done.returncode,
            "counts": counts, "summary": lines[-1] if lines else "", "slowest": slowest}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="test files or node ids, relative to the repository root")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--durations", type=int, default=30)
    args = parser.parse_args(argv)
    missing = [f for f in args.files if not (ROOT / f.split("::")[0]).exists()]
    if missing:
        print(f"error: no such test file(s): {', '.join(missing)}", file=sys.stderr)
        return 2
    report = {"what": "pytest time without and with the session capture cache, one after the other",
              "machine": machine(), "files": args.files, "runs": []}  # machine() records the commit
    for cache in (False, True):
        report["runs"].append(run(args.files, cache, args.durations))
        print(f"capture cache {'on' if cache else 'off'}: {report['runs'][-1]['wall_s']} s wall, "
              f"{report['runs'][-1]['cpu_s']} CPU-s, {report['runs'][-1]['summary']}", flush=True)
    report["load_average_after"] = os.getloadavg()
    off, on = report["runs"]
    report["cpu_saved_fraction"] = round(1 - on["cpu_s"] / off["cpu_s"], 3) if off["cpu_s"] else None
    write_result(report, args.out)
    return 0 if off["returncode"] == on["returncode"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
