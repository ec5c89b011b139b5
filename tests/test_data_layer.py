"""The data layer is one layer: only the engine set-up (sfcrm/db.py) and the migrations speak
SQL or touch a driver; everything else reads and writes through SQLAlchemy statements built from
the models."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SFCRM = Path(__file__).resolve().parents[1] / "sfcrm"
ENGINE_SETUP = {SFCRM / "db.py"}
MIGRATIONS = SFCRM / "migrations"
DRIVERS = {"sqlite3", "psycopg", "psycopg2"}
# the start of a statement, as hand-written SQL begins
SQL = re.compile(
    r"^\s*(SELECT|INSERT|UPDATE|DELETE|CREATE|DROP|ALTER|PRAGMA|BEGIN|COMMIT|ROLLBACK|WITH)\b",
    re.IGNORECASE,
)


def modules() -> list[Path]:
    return sorted(
        path
        for path in SFCRM.rglob("*.py")
        if path not in ENGINE_SETUP and MIGRATIONS not in path.parents
    )


def problems(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"imports {a.name}" for a in node.names if a.name.split(".")[0] in DRIVERS]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in DRIVERS:
            found.append(f"imports from {node.module}")
        elif isinstance(node, ast.Call):
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            if name in ("text", "exec_driver_sql", "executescript", "literal_column"):
                found.append(f"calls {name}() at line {node.lineno}")
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and SQL.match(node.value)
            and re.search(r"\b(FROM|INTO|SET|TABLE|WHERE)\b", node.value, re.IGNORECASE)
        ):
            found.append(f"SQL text at line {node.lineno}: {node.value[:40]!r}")
    return found


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(SFCRM)))
def test_no_module_but_the_engine_set_up_speaks_sql(path: Path) -> None:
    assert problems(path) == []


def test_the_check_finds_what_it_looks_for(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import sqlite3\n"
        "from sqlalchemy import text\n"
        "q = text('x')\n"
        "s = 'SELECT id FROM person WHERE phone = ?'\n"
        "ok = 'Select the payment to resend'\n",
        encoding="utf-8",
    )
    assert [p.split(" at ")[0] for p in problems(sample)] == [
        "imports sqlite3",
        "calls text()",
        "SQL text",
    ]
