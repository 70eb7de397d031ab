"""Sphinx configuration for the django-dbkeepalive documentation.

Build: ``make docs``, or ``python -m sphinx -W --keep-going -b html docs docs/_build/html``.
The pages are Markdown (MyST). The public API is documented by hand in the pages, not
with autodoc, so building the docs never imports the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _version() -> str:
    """``__version__`` from the package's ``__init__.py``, read without importing it."""
    tree = ast.parse((ROOT / "django_dbkeepalive" / "__init__.py").read_text("utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "__version__" for target in node.targets
        ):
            return str(ast.literal_eval(node.value))
    raise RuntimeError("no __version__ in django_dbkeepalive/__init__.py")


project = "django-dbkeepalive"
author = "django-dbkeepalive contributors"
copyright = "django-dbkeepalive contributors"
release = version = _version()

extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "_matrix.md"]

myst_enable_extensions = ["colon_fence", "deflist"]
# `[text](settings.md#client_timeouts)` links to headings, here as on GitHub.
myst_heading_anchors = 3

add_module_names = False

html_theme = "furo"
html_title = f"django-dbkeepalive {release}"
