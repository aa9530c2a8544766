"""The modules every other one may read depend on nothing of the service: the settings, the log
line, the units. (The routes -> manager -> adapter direction is ruff's TID251 rule.)"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import api
from tests.helpers import parse_python

SOURCE = Path(api.__file__).parent


def _imports(path: Path) -> set[str]:
    tree = parse_python(path.read_text(encoding="utf-8"))
    found = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    found |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    return found


@pytest.mark.parametrize("module", ["settings.py", "logfmt.py", "units.py"])
def test_a_base_module_imports_nothing_of_the_service(module: str) -> None:
    ours = sorted(m for m in _imports(SOURCE / module) if m == "api" or m.startswith("api."))
    assert ours == [], f"{module} imports {ours}"
