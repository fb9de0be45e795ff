"""Coverage-guided fuzzing of ``targets.one_input`` with atheris (libFuzzer for Python).

An optional tool, not a dependency of the project nor part of CI (README.md beside this file)::

    pip install atheris
    python -m tests.fuzz.run --write-corpus fuzz-corpus
    python -m tests.fuzz.atheris_target -runs=1000000 -max_len=40000 fuzz-corpus

Arguments are libFuzzer's. fastproxy and h11 are instrumented for coverage; an exception out of
``one_input`` (a broken invariant included) stops the run and leaves the input in a
``crash-*`` file, which ``-runs=1 FILE`` replays.
"""

from __future__ import annotations

import importlib
import sys


def main() -> None:
    # imported by name: atheris is optional and ships no type information
    atheris = importlib.import_module("atheris")
    with atheris.instrument_imports(include=["fastproxy", "h11"]):
        targets = importlib.import_module(f"{__package__}.targets")
    atheris.Setup(sys.argv, targets.one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
