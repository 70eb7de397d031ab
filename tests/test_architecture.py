"""The shape of the package: small modules that say what they own, dependencies that
point down, rules that name no vendor, a public surface with no side effects."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "django_dbkeepalive"
MODULES = sorted(PACKAGE.rglob("*.py"))
#: What sits above the guard: it may use the guard, the guard never imports it.
ABOVE_THE_GUARD = (
    "backends",
    "checks",
    "commands",
    "contrib",
    "diagnose",
    "fresh",
    "management",
    "middleware",
    "pytest_plugin",
    "testing",
)
#: The guard's vendor-neutral modules: they reach a vendor only through the interface.
NEUTRAL = ("rules", "failures", "transactions", "connect", "wrappers", "install", "native")
VENDOR_WORDS = ("mysql", "mariadb", "postgres", "psycopg", "pymysql", "mysqlclient")
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports (relative imports resolved), at any depth."""
    tree = ast.parse(path.read_text())
    here = module_name(path).split(".")  # the package a relative import starts from
    if path.name != "__init__.py":
        here = here[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            found.add(prefix)
            found.update(f"{prefix}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_every_module_is_small_and_says_what_it_owns(path):
    lines = path.read_text().count("\n")
    assert lines <= MAX_LINES, f"{module_name(path)} has {lines} lines (at most {MAX_LINES})"
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc, f"{module_name(path)} has no module docstring"


@pytest.mark.parametrize(
    "path", sorted((PACKAGE / "guard").rglob("*.py")), ids=lambda p: module_name(p)
)
def test_the_guards_modules_never_import_what_sits_above_them(path):
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert "Must never import" in doc, f"{module_name(path)}: say what it must never import"
    above = {f"django_dbkeepalive.{name}" for name in ABOVE_THE_GUARD}
    bad = {m for m in imported(path) if any(m == a or m.startswith(a + ".") for a in above)}
    assert not bad, f"{module_name(path)} imports {sorted(bad)}"


@pytest.mark.parametrize("name", NEUTRAL)
def test_the_rules_name_no_vendor_and_no_concrete_family(name):
    path = PACKAGE / "guard" / f"{name}.py"
    tree = ast.parse(path.read_text())
    families = PACKAGE / "guard" / "families"
    vendors = {p.stem for p in families.glob("*.py")} - {"__init__", "base"}
    prefix = "django_dbkeepalive.guard.families."
    concrete = {
        m
        for m in imported(path)
        if m.startswith(prefix) and m[len(prefix) :].split(".")[0] in vendors
    }
    assert not concrete, f"{name} imports a concrete family: {sorted(concrete)}"
    # Names and strings in the code, not its docstrings and comments.
    words = [n.id for n in ast.walk(tree) if isinstance(n, ast.Name)]
    words += [n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)]
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    words += [
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings
    ]
    named = sorted({w for w in words for v in VENDOR_WORDS if v in w.lower()})
    assert not named, f"{name} names a vendor or a driver: {named}"


def test_importing_the_package_has_no_side_effects():
    loaded = "sorted(m for m in sys.modules if m.startswith(('django_dbkeepalive.', 'django.db')))"
    code = f"import sys, django_dbkeepalive; print({loaded})"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"


def test_every_public_name_resolves_and_has_a_docstring_with_an_example():
    import django_dbkeepalive

    for name in django_dbkeepalive.__all__:
        value = getattr(django_dbkeepalive, name)
        doc = value.__doc__ or ""
        assert doc.strip(), f"django_dbkeepalive.{name} has no docstring"
        assert "Example" in doc, f"django_dbkeepalive.{name}'s docstring has no example"


def test_the_package_ships_its_type_information():
    assert (PACKAGE / "py.typed").exists()
