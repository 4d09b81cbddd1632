"""The root README's "Configuration" table names every variable app/ reads by name.

Found as string literals in `os.environ.get("NAME")`, `os.environ["NAME"]` and
`os.getenv("NAME")`; a name read through a constant is not seen.
"""

from __future__ import annotations

import re

from tests.paths import REPO_ROOT

# os.environ.get("NAME", ...), os.environ["NAME"], os.getenv("NAME"), as written in app/.
READ = re.compile(r"""(?:environ\.get\(|environ\[|getenv\()\s*["']([A-Z][A-Z0-9_]*)["']""")


def _table_variables() -> set[str]:
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \|", section, re.MULTILINE))


def test_every_variable_the_service_reads_is_in_the_table() -> None:
    """A new environment variable read in app/ needs its row."""
    read = {
        name
        for path in (REPO_ROOT / "app").rglob("*.py")
        for name in READ.findall(path.read_text())
    }

    assert "DATABASE_URL" in read  # the pattern finds what the service reads
    assert read <= _table_variables(), f"not in the table: {sorted(read - _table_variables())}"
