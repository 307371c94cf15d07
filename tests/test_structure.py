"""The shape of the package (issue 19's targets): small modules, short functions, no private names across modules.

These limits keep the library readable part by part; a change that breaks one should split the part, not raise the
limit.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ctx_callback"
MAX_MODULE_LINES = 500
MAX_CALLBACK_LINES = 450
MAX_FUNCTION_LINES = 80
#: Functions that are data tables (one entry a line), exempt from the function limit.
DATA_TABLES: set[str] = set()


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def long_modules() -> list[str]:
    too_long = []
    for path in modules():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        limit = MAX_CALLBACK_LINES if path.name == "callback.py" else MAX_MODULE_LINES
        if lines > limit:
            too_long.append(f"{path.relative_to(PACKAGE.parent)}: {lines} lines (limit {limit})")
    return too_long


def long_functions() -> list[str]:
    too_long = []
    for path in modules():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name not in DATA_TABLES:
                # The docstring does not count: it is documentation, not code to read.
                length = node.end_lineno - node.lineno + 1 - _docstring_lines(node)
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}: {length} lines")
    return too_long


def _docstring_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        return first.end_lineno - first.lineno + 1
    return 0


def private_imports() -> list[str]:
    found = []
    for path in modules():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported_modules = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if _is_private(alias.name):
                        found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {alias.name}")
                    imported_modules.add(alias.asname or alias.name)
            elif isinstance(node, ast.Import):
                imported_modules.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in imported_modules and _is_private(node.attr)):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} uses {node.value.id}.{node.attr}")
    return found


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_module_is_over_its_line_limit():
    assert long_modules() == []


def test_no_function_is_over_eighty_lines():
    assert long_functions() == []


def test_no_private_name_is_imported_from_another_module():
    assert private_imports() == []


if __name__ == "__main__":  # python -m tests.test_structure: the whole list, to work through
    for title, items in (("modules", long_modules()), ("functions", long_functions()),
                         ("private imports", private_imports())):
        print(f"{title}: {len(items)}")
        for item in items:
            print("  ", item)
