"""cosmic-ray's test command: run only the tests that execute the mutated lines.

Why it exists: cosmic-ray runs one shell command per mutant, without telling it
which mutant, and has no per-mutant test selection; the whole fast tier per mutant
would take hours. This finds the mutated file and lines by comparing app/database/
with the pristine copy, takes the tests that ran those lines in the baseline run
(mutation/contexts.py, gathered into tests.json by mutation/run.py) and runs them,
fastest first, stopping at the first failure. A line outside function bodies (a
constant, a decorator, a `def`) also gets every test that runs any line of its module.
Tests that read a module's constants by name without running its lines (the
documented-defaults check) are added to those. A mutant that no test reaches exits 0
with NO_TEST in its output: a survivor.

Usage (cwd: a work copy): python -m mutation.select_tests BUILD_DIR
"""

from __future__ import annotations

import ast
import difflib
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path("app/database")
NO_TEST = "mutation.select_tests: NO_TEST, no test runs the mutated lines"
# Tests that check module constants by name (the README's Defaults table against
# the code): coverage sees no line of the module run, so they join the tests of
# every mutant outside function bodies.
READ_CONSTANTS = ["tests/unit/test_documented_defaults.py"]
# The baseline's options (pyproject.toml) plus: no test reordering or caching, and
# none of the plugins the selected tests do not need (schemathesis and hypothesis
# cost a second of imports per mutant; the API contract test is not selected).
PYTEST_OPTIONS = [
    "-x",
    "-q",
    "--no-header",
    "-p",
    "no:cacheprovider",
    "-p",
    "no:schemathesis",
    "-p",
    "no:hypothesispytest",
    "-o",
    "timeout=60",
]


def mutated_lines(pristine: Path) -> tuple[str, set[int]] | None:
    """The file that differs from its pristine copy, and its changed lines (pristine numbering)."""
    for path in sorted(PACKAGE.rglob("*.py")):
        original = (pristine / path).read_text()
        current = path.read_text()
        if current == original:
            continue
        lines: set[int] = set()
        matcher = difflib.SequenceMatcher(
            a=original.splitlines(), b=current.splitlines(), autojunk=False
        )
        for tag, start, end, _, _ in matcher.get_opcodes():
            if tag != "equal":
                lines.update(range(start + 1, max(end, start + 1) + 1))
        return str(path), lines
    return None


def statement_lines(source: str, lines: set[int]) -> set[int]:
    """Every line of each changed line's innermost statement, but its nested statements.

    Coverage records the lines whose bytecode ran, not a statement's first line: a
    condition written over several lines (`if (\n a\n and b\n):`) shows as its inner
    lines, and its `if (` line as none. So a line of a multi-line statement, or of a
    compound statement's header, stands for all of that statement's own lines.
    """
    selected = set(lines)
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.stmt) or node.end_lineno is None:
            continue
        nested = [
            (_first_line(child), child.end_lineno or child.lineno)
            for child in ast.iter_child_nodes(node)
            if isinstance(child, ast.stmt)
        ]
        own = {
            line
            for line in range(node.lineno, node.end_lineno + 1)
            if not any(start <= line <= end for start, end in nested)
        }
        if own & lines:
            selected |= own
    return selected


def _first_line(node: ast.stmt) -> int:
    # A decorated definition starts at its first decorator.
    decorators: list[ast.expr] = getattr(node, "decorator_list", [])
    return min([node.lineno, *(decorator.lineno for decorator in decorators)])


def function_body_lines(source: str) -> set[int]:
    """The lines inside function bodies: the ones that run only when called."""
    inside: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno:
            inside.update(range(node.body[0].lineno, node.end_lineno + 1))
    return inside


def main(build: Path) -> int:
    found = mutated_lines(build / "pristine")
    if found is None:
        print("mutation.select_tests: no mutated file found", file=sys.stderr)
        return 2  # cosmic-ray counts it as killed; the report shows the output
    path, lines = found
    recorded = json.loads((build / "tests.json").read_text())
    by_line: dict[str, list[str]] = recorded["lines"].get(path, {})
    source = (build / "pristine" / path).read_text()
    lines = statement_lines(source, lines)
    tests = {test for line in lines for test in by_line.get(str(line), [])}
    if not lines <= function_body_lines(source):
        # Run at import (a constant, a decorator, a `def`): what it changes shows in
        # whatever the module does, so every test that runs a line of it.
        tests |= {test for per_line in by_line.values() for test in per_line}
        tests |= set(READ_CONSTANTS)
    if not tests:
        print(f"{NO_TEST}: {path} lines {sorted(lines)}")
        return 0
    durations: dict[str, float] = recorded["durations"]
    # The module's own test file first (_liveness.py: test_liveness.py), then by duration.
    own = f"test{Path(path).stem}.py"
    ordered = sorted(tests, key=lambda test: (own not in test, durations.get(test, 0.0), test))
    print(f"mutation.select_tests: {path} lines {sorted(lines)}: {len(ordered)} tests", flush=True)
    command = [sys.executable, "-m", "pytest", *PYTEST_OPTIONS, *ordered]
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]).resolve()))
