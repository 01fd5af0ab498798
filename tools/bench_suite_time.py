"""Test time with and without the session capture cache (tests/capture_cache.py), measured in one run.

Runs pytest twice on the same selection, each one process (no xdist), one thread, under `nice`: once with
SVDQ_TEST_CAPTURE_CACHE=0 (every compile captures afresh, as before the cache) and once with the cache. Without
test files the selection is the whole default suite (`make test`'s: pyproject's testpaths and markers).
`--concurrent` starts both runs at the same time, so on a shared machine both see the same load over time: the
primary metric is then each run's CPU seconds (pytest and the processes it waited for), wall time second. Each
run gets its own kernel cache and pytest temporary directory, both empty at the start. Records per run the wall
time, the CPU seconds, the pass/fail counts and the slowest tests (`--durations`), with the machine, the load
average sampled every minute and the commit (bench_common.machine).

    python tools/bench_suite_time.py --concurrent --out bench/results/suite-time-whole.json
    python tools/bench_suite_time.py tests/test_cli.py --out /tmp/suite-time-cli.json
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import machine, write_result

ROOT = Path(__file__).resolve().parents[1]
DURATION = re.compile(r"^([\d.]+)s (call|setup|teardown)\s+(\S+)$")
SUMMARY = re.compile(r"(\d+) (passed|failed|error|errors|skipped|deselected)")
LOAD_EVERY_S = 60


class Run:
    """One pytest process and where its output goes."""

    def __init__(self, files: list[str], cache: bool, durations: int, nice: int, work: Path):
        name = "on" if cache else "off"
        env = {**os.environ, "SVDQ_TEST_CAPTURE_CACHE": "1" if cache else "0", "OMP_NUM_THREADS": "1",
               "TRITON_INTERPRET": "1", "SVDQ_KERNEL_CACHE": str(work / f"kernels-{name}")}
        self.cache = cache
        self.log = work / f"pytest-{name}.log"
        command = ["nice", "-n", str(nice)] if nice else []
        command += [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", f"--durations={durations}",
                    f"--basetemp={work / f'basetemp-{name}'}", *files]
        with open(self.log, "w") as out:
            self.start = time.perf_counter()
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)

    def result(self, status: int, usage, end: float) -> dict:
        self.process.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: Popen must not wait again
        lines = self.log.read_text().splitlines()
        slowest = [{"seconds": float(m.group(1)), "when": m.group(2), "test": m.group(3)}
                   for m in map(DURATION.match, lines) if m]
        counts = {kind: int(n) for n, kind in SUMMARY.findall(lines[-1] if lines else "")}
        if self.process.returncode not in (0, 1):
            print("\n".join(lines[-60:]), file=sys.stderr)
        return {"capture_cache": self.cache, "wall_s": round(end - self.start, 1),
                "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "user_s": round(usage.ru_utime, 1),
                "sys_s": round(usage.ru_stime, 1), "returncode": self.process.returncode, "counts": counts,
                "summary": lines[-1] if lines else "", "slowest": slowest}


def wait_all(runs: list[Run], loads: list) -> list[dict]:
    """Reap the runs as they end; wait4 gives each its own CPU time, which RUSAGE_CHILDREN cannot separate."""
    by_pid = {run.process.pid: run for run in runs}
    results = {}
    next_sample = time.monotonic()
    while len(results) < len(runs):
        if time.monotonic() >= next_sample:
            loads.append(os.getloadavg())
            next_sample += LOAD_EVERY_S
        pid, status, usage = os.wait4(-1, os.WNOHANG)
        if pid == 0:
            time.sleep(1)
        elif pid in by_pid:
            results[pid] = by_pid[pid].result(status, usage, time.perf_counter())
            print(f"capture cache {'on' if by_pid[pid].cache else 'off'}: {results[pid]['wall_s']} s wall, "
                  f"{results[pid]['cpu_s']} CPU-s, {results[pid]['summary']}", flush=True)
    return [results[run.process.pid] for run in runs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", help="test files or node ids, relative to the repository root "
                        "(none: the whole default suite)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--concurrent", action="store_true", help="run both at once (same load) instead of in turn")
    parser.add_argument("--nice", type=int, default=10, help="niceness of the pytest processes (0: as this one)")
    parser.add_argument("--durations", type=int, default=30)
    args = parser.parse_args(argv)
    missing = [f for f in args.files if not (ROOT / f.split("::")[0]).exists()]
    if missing:
        print(f"error: no such test file(s): {', '.join(missing)}", file=sys.stderr)
        return 2
    report = {"what": "pytest time without and with the session capture cache, "
                      + ("run concurrently" if args.concurrent else "one after the other"),
              "machine": machine(), "files": args.files or "the default suite (make test's selection)",
              "nice": args.nice, "load_average_samples": []}  # machine() records the commit and the starting load
    loads = report["load_average_samples"]
    with tempfile.TemporaryDirectory(prefix="suite-time-") as work:
        start = lambda cache: Run(args.files, cache, args.durations, args.nice, Path(work))  # noqa: E731
        if args.concurrent:
            report["runs"] = wait_all([start(False), start(True)], loads)
        else:
            report["runs"] = wait_all([start(False)], loads) + wait_all([start(True)], loads)
    report["load_average_after"] = os.getloadavg()
    off, on = report["runs"]
    report["cpu_saved_fraction"] = round(1 - on["cpu_s"] / off["cpu_s"], 3) if off["cpu_s"] else None
    report["wall_saved_fraction"] = round(1 - on["wall_s"] / off["wall_s"], 3) if off["wall_s"] else None
    write_result(report, args.out)
    return 0 if off["returncode"] == on["returncode"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
