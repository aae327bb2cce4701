"""How long `advcl --help` and friends take, from process start to exit.

Runs each command several times as a new process (``python -m advcl_cli ...``, stdout and
stderr discarded) and prints the fastest and the median wall time of each, with the load
average before the runs. ``--tree DIR=LABEL`` (repeatable) times the advcl_cli of another
source tree (e.g. ``git archive`` of an earlier commit) as well: the trees take turns run by
run, so a load that changes meanwhile touches both alike. Unless ``--no-record`` the table
goes to benchmarks/RESULTS.md.

Usage:

    git archive --prefix=before/ HEAD~3 | tar -x -C /tmp
    python benchmarks/cli_start.py --runs 5 --tree /tmp/before=before --tree .=after
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADING = "## Command start time (benchmarks/cli_start.py)"
COMMANDS = (
    "--help",
    "pretrain --help",
    "finetune --help",
    "eval --help",
    "pretrain --bogus-option",
    "zoo list",
)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or 'CPU'}, {os.cpu_count()} cores"


def timed(args: list[str], tree: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve())}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "advcl_cli", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env=env, cwd=tempfile.gettempdir())
    return time.perf_counter() - t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5, help="runs of each command (after one untimed warm-up run)")
    p.add_argument("--tree", action="append", default=[], metavar="DIR=LABEL",
                   help="a source tree holding advcl_cli, and its name in the table (default: this checkout)")
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    trees = [t.partition("=")[::2] for t in args.tree] or [(str(Path(__file__).parents[1]), "this tree")]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = []
    for command in COMMANDS:
        times = {label: [] for _, label in trees}
        for tree, _ in trees:
            timed(command.split(), tree)  # the first run fills the OS's file cache
        for _ in range(args.runs):
            for tree, label in trees:
                times[label].append(timed(command.split(), tree))
        for label, values in times.items():
            rows.append((command, label, min(values), statistics.median(values)))
            print(f"advcl {command} ({label}): fastest {min(values):.2f} s, median {statistics.median(values):.2f} s",
                  file=sys.stderr)
    lines = [
        f"{date.today().isoformat()}: {cpu_name()}, 1-minute load average {load:.1f} before the runs; "
        f"{args.runs} runs of each command per tree, the trees taking turns",
        "",
        "| command | tree | fastest s | median s |",
        "|---|---|---|---|",
        *(f"| `advcl {c}` | {label} | {best:.2f} | {median:.2f} |" for c, label, best, median in rows),
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_record:
        sys.path.insert(0, str(Path(__file__).parent))
        from _common import record

        record(HEADING, text)


if __name__ == "__main__":
    main()
