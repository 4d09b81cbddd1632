"""`make mutation`: cosmic-ray on app/database/, each mutant against the tests that reach it.

Why it exists: cosmic-ray mutates files in place, one mutant at a time, and runs a
fixed command; this module gives it what a run on this repository needs:
- work copies under BUILD (default build/mutation/), so the checkout is never
  mutated: `pristine/` (a snapshot of the tracked files, of the working tree or of
  --rev) and one `shard-N/` per worker;
- a baseline run of the fast tiers (tests/unit, tests/integration, tests/sqlite),
  which must pass, recording per test the lines it runs (mutation/contexts.py):
  mutation/select_tests.py, cosmic-ray's test command, then runs only those;
- mutants that cannot change behaviour left out before running: the ones inside
  annotations (`from __future__ import annotations` never evaluates them), the
  `*`/`**` of unpackings that cosmic-ray's parser takes for binary operators, and a
  binary operator's replacement by the rarer operators (shifts, bitwise, `%`, `//`,
  `**`), which tell nothing that `+ - * /` do not; of a comparison's, all but its
  negation and boundary shift;
- the work split over --workers shards, each a `cosmic-ray exec` of its own;
- BUILD/report.txt: per module, generated/skipped/killed/survived/timeout/no-test
  and the score, then every surviving mutant with its diff.

- --rerun PREVIOUS_BUILD (repeatable): after adding tests, run again only the
  mutants that survived in earlier runs on the same package code (checked per
  module), taking every other result from them; the report covers whole modules.

Usage (from the repository root, in .venv-mutation):
    python -m mutation.run [--workers 2] [--rev REV] [--build DIR] [--rerun DIR] [MODULE ...]
MODULE: paths under app/database/ (default: all of it).
"""

from __future__ import annotations

import argparse
import ast
import collections
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import time
from pathlib import Path

# Installed in .venv-mutation only (requirements-mutation.txt).
import coverage  # type: ignore[import-not-found,unused-ignore]

PACKAGE = "app/database"
# The SQLite tier (10 s) too: the engine set-up and read-only mode have a SQLite branch.
FAST_TIERS = ["tests/unit", "tests/integration", "tests/sqlite"]
# A fuzzer of the service through a subprocess (15-30 s), and the benchmarks' runs
# (subprocesses too, with load-sensitive round-trip targets): they reach no line of
# the package in process, so no mutant could select them.
BASELINE_IGNORES = [
    "--ignore=tests/integration/test_api_contract.py",
    "--ignore=tests/integration/test_isolation_benchmark.py",
    "--ignore=tests/integration/test_request_path_benchmark.py",
]
RARE_OPERATORS = (
    r"core/ReplaceBinaryOperator_.*_(BitOr|BitAnd|BitXor|LShift|RShift|Mod|FloorDiv|Pow)$"
)
# Of a comparison's replacements, the negation and the boundary shift only (== to !=,
# < to <=, is to is not): `==` to `>` or `is` adds a mutant per comparison, not a test.
FAR_COMPARISONS = (
    r"core/ReplaceComparisonOperator_(?!(Eq_NotEq|NotEq_Eq|Is_IsNot|IsNot_Is|Lt_LtE|LtE_Lt"
    r"|Gt_GtE|GtE_Gt|In_NotIn|NotIn_In)$)"
)
OTHER_SHARD = "mutation.run: another shard's"
PREVIOUS = "mutation.run: result of the previous run (--rerun), "
IN_ANNOTATION = "mutation.run: in an annotation"
NOT_AN_OPERATOR = "mutation.run: an unpacking, not a binary operator"
# A line the tests of this run cannot judge (a SQLAlchemy-2.0-only fallback), its
# reason written beside it in the source; the report lists these apart.
NO_MUTATE = "mutation.run: # pragma: no mutate"
NO_MUTATE_MARK = "# pragma: no mutate"
# A baseline with more failures than this is a broken suite, not a flaky test or two.
MAX_BASELINE_FAILURES = 3
BIN = Path(sys.executable).parent  # cosmic-ray's commands, installed beside this Python


def snapshot(destination: Path, rev: str | None) -> None:
    """The tracked files: of the working tree (uncommitted edits included), or of `rev`."""
    destination.mkdir(parents=True)
    if rev is not None:
        archive = subprocess.run(["git", "archive", rev], check=True, capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(destination, filter="data")
        # This tooling as checked out, whatever `rev` had of it.
        shutil.rmtree(destination / "mutation", ignore_errors=True)
        shutil.copytree(Path(__file__).parent, destination / "mutation")
        return
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True,
        capture_output=True,
    ).stdout
    for name in listed.decode().split("\0"):
        if name and Path(name).is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(name, target)


def baseline(build: Path, workers: int) -> None:
    """Run the fast tiers once on the pristine copy; keep each test's lines and duration."""
    data = build / "coverage"
    data.mkdir()
    env = dict(os.environ, MUTATION_COVERAGE_FILE=str(data / "data"))
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    command += ["-p", "mutation.contexts", "-n", str(workers), *BASELINE_IGNORES, *FAST_TIERS]
    print("baseline:", " ".join(command[1:]), flush=True)
    status = subprocess.call(command, cwd=build / "pristine", env=env)
    failed = sorted(
        {test for part in data.glob("failed.*.json") for test in json.loads(part.read_text())}
    )
    if status != 0 and not 0 < len(failed) <= MAX_BASELINE_FAILURES:
        sys.exit("mutation.run: the fast tiers fail without any mutant; fix them first")
    # A test or two that failed without a mutant (a load-sensitive one under the run's
    # workers) cannot judge a mutant: left out of every selection, named in the report.
    # combine() takes the files named after its own data file's: data.<host>.<pid>...
    combined = coverage.Coverage(data_file=str(data / "data"))
    combined.combine([str(data)], keep=True)
    measured = combined.get_data()
    root = str((build / "pristine").resolve()) + os.sep
    lines: dict[str, dict[str, list[str]]] = {}
    for measured_file in measured.measured_files():
        relative = measured_file.removeprefix(root)
        contexts = measured.contexts_by_lineno(measured_file)
        lines[relative] = {
            str(line): sorted(c for c in names if c and c not in failed)
            for line, names in contexts.items()
        }
    durations: dict[str, float] = {}
    for part in data.glob("durations.*.json"):
        durations.update(json.loads(part.read_text()))
    recorded = {"lines": lines, "durations": durations, "failed": failed}
    (build / "tests.json").write_text(json.dumps(recorded))


def write_config(build: Path, modules: list[str]) -> Path:
    config = build / "cosmic-ray.toml"
    select = f"{sys.executable} -m mutation.select_tests {build.resolve()}"
    config.write_text(
        "[cosmic-ray]\n"
        f"module-path = {json.dumps(modules)}\n"
        # A bound on the whole selection (pytest-timeout bounds each test): the longest
        # take 1.5 min, 3 under load; a mutant that makes every close() wait out its
        # grace period runs each test 10 s longer, and is a timeout.
        "timeout = 300.0\n"
        "excluded-modules = []\n"
        f"test-command = {json.dumps(select)}\n"
        '[cosmic-ray.distributor]\nname = "local"\n'
        "[cosmic-ray.filters.operators-filter]\n"
        f"exclude-operators = {json.dumps([RARE_OPERATORS, FAR_COMPARISONS])}\n"
    )
    return config


Span = tuple[tuple[int, int], tuple[int, int]]


def spans_of(source: str) -> tuple[list[Span], list[Span]]:
    """Where annotations are, and where a binary operator can be (between its operands).

    cosmic-ray's parser reads the `**` and `*` of unpacking (`f(**kwargs)`,
    `{**a, **b}`) as binary operators: their "replacements" are syntax errors or
    other unpackings, not mutants of an operation.
    """
    spans: list[Span] = []
    operators: list[Span] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.BinOp) and node.left.end_lineno is not None:
            left_end = (node.left.end_lineno, node.left.end_col_offset or 0)
            operators.append((left_end, (node.right.lineno, node.right.col_offset)))
        annotations: list[ast.expr | None] = []
        if isinstance(node, ast.arg):
            annotations.append(node.annotation)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            annotations.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
        for annotation in annotations:
            if annotation is not None and annotation.end_lineno is not None:
                start = (annotation.lineno, annotation.col_offset)
                end = (annotation.end_lineno, annotation.end_col_offset or 0)
                spans.append((start, end))
    return spans, operators


def skip(database: sqlite3.Connection, job_ids: list[str], why: str) -> None:
    # cosmic-ray's own filters record a skipped job so (work_results, outcome SKIPPED).
    database.executemany(
        "INSERT INTO work_results (worker_outcome, output, job_id) VALUES ('SKIPPED', ?, ?)",
        [(why, job) for job in job_ids],
    )
    database.commit()


MutantKey = tuple[str, str, int, int, int]


def previous_results(
    earlier_runs: list[Path], pristine: Path
) -> dict[MutantKey, tuple[str, str | None, str, str]]:
    """The earlier runs' result per mutant, but their survivors': those run again.

    Only valid on the same code: every module of an earlier run must be unchanged.
    """
    results: dict[MutantKey, tuple[str, str | None, str, str]] = {}
    sessions = [session for run in earlier_runs for session in sorted(run.glob("shard-*.sqlite"))]
    for session in sessions:
        with sqlite3.connect(session) as database:
            for row in database.execute(
                "SELECT s.module_path, s.operator_name, s.occurrence, s.start_pos_row,"
                " s.start_pos_col, r.worker_outcome, r.test_outcome, r.output, r.diff"
                " FROM mutation_specs s JOIN work_results r ON r.job_id = s.job_id"
            ):
                key, (worker, test, output, diff) = row[:5], row[5:]
                if output == OTHER_SHARD or worker == "SKIPPED" or test == "SURVIVED":
                    continue
                results[key] = (worker, test, output or "", diff or "")
        run = session.parent
        for module in {key[0] for key in results}:
            earlier = run / "pristine" / module
            if earlier.exists() and earlier.read_text() != (pristine / module).read_text():
                sys.exit(f"mutation.run: --rerun: {module} changed since {run}; run it whole")
    return results


def prepare_session(
    build: Path, config: Path, shards: int, previous: list[Path] | None = None
) -> list[Path]:
    session = build / "session.sqlite"
    cwd = build / "pristine"
    subprocess.run(
        [str(BIN / "cosmic-ray"), "init", str(config), str(session)], cwd=cwd, check=True
    )
    subprocess.run(
        [str(BIN / "cr-filter-operators"), str(session), str(config)], cwd=cwd, check=True
    )
    database = sqlite3.connect(session)
    pending = database.execute(
        "SELECT s.job_id, s.module_path, s.start_pos_row, s.start_pos_col, s.operator_name,"
        " s.occurrence FROM mutation_specs s"
        " LEFT JOIN work_results r ON r.job_id = s.job_id WHERE r.job_id IS NULL"
        " ORDER BY s.module_path, s.start_pos_row, s.start_pos_col, s.job_id"
    ).fetchall()
    spans: dict[str, tuple[list[Span], list[Span]]] = {}
    sources: dict[str, list[str]] = {}
    no_mutate = []
    in_annotations = []
    not_operators = []
    runnable = []
    earlier = previous_results(previous, cwd) if previous else {}
    carried = []
    for job, module, row, col, operator, occurrence in pending:
        if module not in spans:
            spans[module] = spans_of((cwd / module).read_text())
            sources[module] = (cwd / module).read_text().splitlines()
        annotations, operators = spans[module]
        if NO_MUTATE_MARK in sources[module][row - 1]:
            no_mutate.append(job)
        elif any(start <= (row, col) < end for start, end in annotations):
            in_annotations.append(job)
        elif operator.startswith("core/ReplaceBinaryOperator_") and not any(
            start <= (row, col) < end for start, end in operators
        ):
            not_operators.append(job)
        elif (key := (module, operator, occurrence, row, col)) in earlier:
            worker, test, output, diff = earlier[key]
            carried.append((worker, test, PREVIOUS + output, diff, job))
        else:
            runnable.append(job)
    skip(database, no_mutate, NO_MUTATE)
    skip(database, in_annotations, IN_ANNOTATION)
    skip(database, not_operators, NOT_AN_OPERATOR)
    database.executemany(
        "INSERT INTO work_results (worker_outcome, test_outcome, output, diff, job_id)"
        " VALUES (?, ?, ?, ?, ?)",
        carried,
    )
    database.commit()
    database.close()
    sessions = []
    for shard in range(shards):
        shard_session = build / f"shard-{shard}.sqlite"
        shutil.copy(session, shard_session)
        others = [job for index, job in enumerate(runnable) if index % shards != shard]
        with sqlite3.connect(shard_session) as database:
            skip(database, others, OTHER_SHARD)
        sessions.append(shard_session)
    return sessions


def execute(build: Path, config: Path, sessions: list[Path]) -> None:
    running: list[tuple[str, subprocess.Popen[bytes]]] = []
    for shard, session in enumerate(sessions):
        work = build / f"shard-{shard}"
        shutil.copytree(build / "pristine", work, ignore=shutil.ignore_patterns("__pycache__"))
        log = (build / f"shard-{shard}.log").open("w")
        command = [str(BIN / "cosmic-ray"), "exec", str(config), str(session)]
        process = subprocess.Popen(command, cwd=work, stdout=log, stderr=subprocess.STDOUT)
        running.append((f"shard-{shard}", process))
    for name, process in running:
        if process.wait() != 0:
            sys.exit(f"mutation.run: cosmic-ray exec failed in {name}: see {name}.log")


def report(build: Path, sessions: list[Path], seconds: float) -> str:
    """One line per module, then the survivors; each job's result is its own shard's."""
    rows: dict[str, tuple[str, int, str, str, str, str, str]] = {}
    for session in sessions:
        with sqlite3.connect(session) as database:
            for row in database.execute(
                "SELECT s.job_id, s.module_path, s.start_pos_row, s.operator_name,"
                " r.worker_outcome, r.test_outcome, r.output, r.diff FROM mutation_specs s"
                " LEFT JOIN work_results r ON r.job_id = s.job_id"
            ):
                job, module, line, operator, worker, test, output, diff = row
                if output == OTHER_SHARD and job in rows:
                    continue
                rows[job] = (module, line, operator, worker, test, output or "", diff or "")
    counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    survivors = []
    for module, line, operator, worker, test, output, diff in rows.values():
        tally = counts[module]
        tally["generated"] += 1
        if worker == "SKIPPED" and output == NO_MUTATE:
            tally["no-mutate"] += 1
            survivors.append((module, line, operator, "# pragma: no mutate", diff))
        elif worker == "SKIPPED":
            tally["skipped"] += 1
        elif worker is None:
            tally["not run"] += 1
        elif test == "SURVIVED":
            no_test = "NO_TEST" in output
            tally["no-test" if no_test else "survived"] += 1
            why = "no test reaches it" if no_test else ""
            survivors.append((module, line, operator, why, diff))
        elif output.removeprefix(PREVIOUS) == "timeout" or "+ Timeout +" in output:
            tally["timeout"] += 1
        elif test == "KILLED":
            tally["killed"] += 1
        else:
            tally[f"{worker}/{test}".lower()] += 1
    columns = [
        "generated",
        "skipped",
        "killed",
        "survived",
        "timeout",
        "no-test",
        "no-mutate",
        "not run",
    ]
    out = [
        f"Mutation testing of {PACKAGE}/ (cosmic-ray, mutation/run.py): {len(rows)} mutants "
        f"in {seconds / 60:.1f} min",
        "skipped: inside an annotation, an unpacking's * or ** taken for an operator, or a",
        "binary operator replaced by a rare one (shift, bitwise, %, //, **), or a comparison",
        "by one other than its negation or boundary shift;",
        "no-mutate: on a line marked `# pragma: no mutate` (its reason beside it), not run;",
        "score: (killed + timeout) / (generated - skipped)",
        "",
        f"{'module':40} " + " ".join(f"{c:>9}" for c in columns) + "     score",
    ]
    total: collections.Counter[str] = collections.Counter()
    for module in sorted(counts):
        tally = counts[module]
        total.update(tally)
        out.append(_row(module, tally, columns))
    out.append(_row("total", total, columns))
    other = sorted({k for t in counts.values() for k in t} - set(columns))
    if other:
        out.append(f"other outcomes: {', '.join(other)} (see the session databases)")
    failed = json.loads((build / "tests.json").read_text()).get("failed", [])
    if failed:
        out += ["", "Failed in the baseline run, so left out of every mutant's tests:"]
        out += [f"    {test}" for test in failed]
    out += ["", f"Surviving mutants ({len(survivors)}):", ""]
    for module, line, operator, why, diff in sorted(survivors):
        out.append(f"{module}:{line} {operator}{' (' + why + ')' if why else ''}")
        changed = [d for d in diff.splitlines() if d[:1] in "+-" and d[:3] not in ("+++", "---")]
        if not changed:  # not run, so no diff: the line it would mutate
            changed = [" " + (build / "pristine" / module).read_text().splitlines()[line - 1]]
        out += [f"    {d}" for d in changed]
    return "\n".join(out) + "\n"


def _row(module: str, tally: collections.Counter[str], columns: list[str]) -> str:
    tested = tally["generated"] - tally["skipped"]
    score = f"{(tally['killed'] + tally['timeout']) / tested:6.1%}" if tested else "     -"
    return f"{module:40} " + " ".join(f"{tally[c]:>9}" for c in columns) + f"  {score}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", default=[PACKAGE])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rev", help="mutate this commit instead of the working tree")
    parser.add_argument("--build", type=Path, default=Path("build/mutation"))
    parser.add_argument(
        "--rerun", type=Path, action="append", help="an earlier run's build directory (repeatable)"
    )
    args = parser.parse_args()
    started = time.monotonic()
    build: Path = args.build.resolve()
    previous = [run.resolve() for run in args.rerun or []]
    if build in previous:
        sys.exit("mutation.run: --rerun needs the earlier run in another --build directory")
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir(parents=True)
    snapshot(build / "pristine", args.rev)
    baseline(build, args.workers)
    config = write_config(build, args.modules)

    sessions = prepare_session(build, config, args.workers, previous)
    execute(build, config, sessions)
    text = report(build, sessions, time.monotonic() - started)
    (build / "report.txt").write_text(text)
    print(text)
    print(f"written: {build / 'report.txt'}")


if __name__ == "__main__":
    main()
