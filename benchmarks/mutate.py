"""mutmut over one part of realflow, with the unit tests that can kill its mutants quickly.

mutmut 3 takes the files to mutate (`only_mutate`) and the tests to run
(`pytest_add_cli_args_test_selection`) from `[tool.mutmut]` in pyproject.toml only, and that
section serves realflow/algorithms. This runs mutmut's own command line with both replaced by a
named target (docs/testing.md, "Mutation testing"):

    python benchmarks/mutate.py TARGET run [--max-children N] [MUTANT_NAME_GLOB...]
    python benchmarks/mutate.py TARGET results | show NAME | browse

`make mutate MUTATE_TARGET=interfaces` does the first. Switching target changes the selected
tests, so mutmut resets every cached result in mutants/ and reruns its stats pass: record a
target's results before running another.

mutmut copies the files it does not mutate into mutants/ unmutated, and later takes any copy
newer than its source for an already mutated file: after a run of another target it would find
no mutant in this target's files ("0 files mutated, ... 1 unmodified"). So the unmutated copies
of this target's files are removed first, and mutmut mutates them again.
"""

from __future__ import annotations

import glob
import logging
import os
import sys

# (files to mutate, pytest arguments that select the tests)
TARGETS: dict[str, tuple[list[str], list[str]]] = {
    "algorithms": (["realflow/algorithms/*.py"], ["tests/algorithms"]),
    # The interface tests build tiny models; the micro-batch invariance file alone takes ~100 s
    # and checks what the others check per interface, so it is left out.
    "interfaces": (
        ["realflow/interfaces/*.py"],
        ["tests/interfaces", "--ignore=tests/interfaces/test_micro_batch_invariance.py"],
    ),
    "losses": (["realflow/interfaces/losses.py"], ["tests/interfaces/test_losses.py"]),
    # The master's rules: scheduling (test_master_rules), weight copies and staleness
    # (test_async), the sampling loop (test_sampling_loop); ~60 s in all.
    "master": (
        ["realflow/system/master.py"],
        [
            "tests/system/test_master_rules.py",
            "tests/system/test_async.py",
            "tests/system/test_sampling_loop.py",
        ],
    ),
}


def drop_unmutated_copies(only_mutate: list[str], mutants_dir: str = "mutants") -> list[str]:
    """Remove the copies in `mutants_dir` of the files to mutate that hold no mutant (copied
    there by a run of another target); returns their paths."""
    dropped = []
    for pattern in only_mutate:
        for path in glob.glob(pattern, recursive=True):
            copy = os.path.join(mutants_dir, path)
            if os.path.isfile(copy):
                with open(copy, encoding="utf-8") as f:
                    mutated = "__mutmut_" in f.read()
                if not mutated:
                    os.remove(copy)
                    dropped.append(copy)
    if dropped:
        logging.getLogger(__name__).warning(
            "mutating again (left unmutated by another target): %s", dropped
        )
    return dropped


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in TARGETS:
        got = argv[0] if argv else "nothing"
        raise SystemExit(
            f"usage: mutate.py TARGET MUTMUT_ARGS...; TARGET one of {sorted(TARGETS)}, got {got}"
        )
    only_mutate, tests = TARGETS[argv[0]]
    drop_unmutated_copies(only_mutate)
    from mutmut.__main__ import cli  # imported here: the usage error needs no mutmut
    from mutmut.configuration import config

    cfg = config()  # reads [tool.mutmut]; the forked workers inherit the replaced fields
    cfg.only_mutate = only_mutate
    cfg.pytest_add_cli_args_test_selection = tests
    cli(argv[1:], prog_name="mutmut")


if __name__ == "__main__":
    main(sys.argv[1:])
