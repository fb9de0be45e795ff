"""Long fuzzing runs of ``targets.one_input``: millions of generated streams, no hypothesis.

    python -m tests.fuzz.run --examples 1000000 --jobs 2

Each job draws streams from ``grammar.stream`` with its own ``random.Random`` seed (``--seed``
plus the job's number), calls ``one_input`` on each and, for one stream in ``--pieces-every``,
``check_in_pieces`` with random read boundaries. A failure is shrunk (bytes removed while the
same exception is raised at the same place) and printed as a Python bytes literal; with
``--crash-dir`` the shrunk input is also written there. The exit status is 1 when anything
failed. ``--write-corpus DIR`` writes the seed corpus as files, for coverage-guided fuzzers.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import multiprocessing
import random
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .corpus import SEEDS
from .grammar import RandomSource, cuts, stream
from .targets import check_in_pieces, one_input


@dataclass
class Failure:
    """One distinct failure: where it was raised, and the smallest input found for it."""

    signature: str
    message: str
    example: bytes
    count: int = 1


@dataclass
class Report:
    inputs: int = 0
    seconds: float = 0.0
    failures: dict[str, Failure] = field(default_factory=dict)


def signature(exc: BaseException) -> str:
    """Exception type and the innermost frame of fastproxy or the fuzz target that raised it."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "fastproxy" in f.filename or "fuzz" in f.filename] or frames
    where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"
    return f"{type(exc).__name__} at {where}"


def failure_of(check: Callable[[bytes], None], data: bytes) -> str | None:
    try:
        check(data)
    except Exception as exc:
        return signature(exc)
    return None


def shrink(check: Callable[[bytes], None], data: bytes, wanted: str, budget: int = 4000) -> bytes:
    """Remove ever smaller runs of bytes while ``check`` still fails with ``wanted``."""
    size = max(1, len(data) // 2)
    while size >= 1 and budget > 0:
        at = 0
        while at < len(data) and budget > 0:
            candidate = data[:at] + data[at + size :]
            budget -= 1
            if failure_of(check, candidate) == wanted:
                data = candidate
            else:
                at += size
        size //= 2
    return data


def fuzz(examples: int, seed: int, pieces_every: int = 4) -> Report:
    """Run ``examples`` generated streams through the target; the failures found, shrunk."""
    rng = random.Random(seed)  # noqa: S311  (reproducible test inputs, not secrets)
    source = RandomSource(rng)
    report = Report()
    start = time.monotonic()
    for index in range(examples):
        data = stream(source)
        checks: list[Callable[[bytes], None]] = [one_input]
        if pieces_every and index % pieces_every == 0:
            checks.append(functools.partial(_in_pieces, cuts(source, len(data))))
        for check in checks:
            try:
                check(data)
            except Exception as exc:
                key = signature(exc)
                known = report.failures.get(key)
                if known is not None:
                    known.count += 1
                    continue
                small = shrink(check, data, key)
                message = str(exc).splitlines()[0][:300] if str(exc) else ""
                report.failures[key] = Failure(key, message, small)
        report.inputs += 1
    report.seconds = time.monotonic() - start
    return report


def _in_pieces(boundaries: list[int], data: bytes) -> None:
    check_in_pieces(data, boundaries)


def _job(args: tuple[int, int, int]) -> Report:
    return fuzz(*args)


def merge(reports: Sequence[Report]) -> Report:
    total = Report()
    for report in reports:
        total.inputs += report.inputs
        total.seconds = max(total.seconds, report.seconds)
        for key, failure in report.failures.items():
            known = total.failures.get(key)
            if known is None:
                total.failures[key] = failure
            else:
                known.count += failure.count
                if len(failure.example) < len(known.example):
                    known.example = failure.example
    return total


def write_corpus(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in SEEDS.items():
        (directory / f"seed-{name}").write_bytes(data)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz.run", description=__doc__)
    parser.add_argument("--examples", type=int, default=100_000, help="inputs in all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="processes (seeds seed, seed+1...)")
    parser.add_argument("--pieces-every", type=int, default=4, metavar="N")
    parser.add_argument("--crash-dir", type=Path)
    parser.add_argument("--write-corpus", type=Path, metavar="DIR")
    args = parser.parse_args(argv)
    if args.write_corpus is not None:
        write_corpus(args.write_corpus)
        print(f"wrote {len(SEEDS)} seeds to {args.write_corpus}")
        return 0
    jobs = max(1, args.jobs)
    shares = [args.examples // jobs + (1 if i < args.examples % jobs else 0) for i in range(jobs)]
    tasks = [(share, args.seed + i, args.pieces_every) for i, share in enumerate(shares)]
    started = time.monotonic()
    if jobs == 1:
        reports = [_job(tasks[0])]
    else:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            reports = pool.map(_job, tasks)
    report = merge(reports)
    wall = time.monotonic() - started
    rate = report.inputs / wall if wall else 0.0
    print(
        f"inputs: {report.inputs}  jobs: {jobs}  seeds: {args.seed}..{args.seed + jobs - 1}  "
        f"wall: {wall:.1f} s  ({rate:.0f} inputs/s)  distinct failures: {len(report.failures)}"
    )
    for failure in report.failures.values():
        print(f"\nFAIL {failure.signature} (x{failure.count}): {failure.message}")
        print(f"  minimal input ({len(failure.example)} bytes): {failure.example!r}")
        if args.crash_dir is not None:
            args.crash_dir.mkdir(parents=True, exist_ok=True)
            name = "crash-" + hashlib.sha256(failure.example).hexdigest()[:16]
            (args.crash_dir / name).write_bytes(failure.example)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
