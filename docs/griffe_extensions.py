"""Griffe extensions for the API reference: the lazily imported top-level names, and Sphinx roles as code.

``ctx_callback/__init__.py`` exports its public names through ``_EXPORTS`` (name -> defining module) and a module
``__getattr__``, so that ``import ctx_callback`` does not load torch. Griffe reads code statically and would only see
the names repeated under ``if TYPE_CHECKING:``; this extension adds an alias for every entry of ``_EXPORTS``, so
``::: ctx_callback.NAME`` works for every public name, wherever the package defines it.

The docstrings cross-reference with Sphinx roles (``:class:`~ctx_callback.errors.ConfigurationError```), which
Markdown would show as they are written; :class:`SphinxRolesAsCode` shows each as code, as Sphinx would print it
(the last component after ``~``).
"""

from __future__ import annotations

import ast
import re
from typing import TYPE_CHECKING, Any

try:
    from griffe import Alias, Extension
except ImportError:  # without the docs extra the helpers below still import, for the tests
    Alias, Extension = None, object  # type: ignore[assignment,misc]

if TYPE_CHECKING:
    import griffe


def lazy_exports(init_source: str) -> dict[str, str]:
    """The ``_EXPORTS`` mapping of a package ``__init__`` (public name -> module relative to the package)."""
    for node in ast.parse(init_source).body:
        target = node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        if isinstance(target, ast.Name) and target.id == "_EXPORTS" and node.value is not None:
            return ast.literal_eval(node.value)
    return {}


class LazyExports(Extension):
    """Alias ``ctx_callback.NAME`` to ``ctx_callback.<module>.NAME`` for each lazily exported name."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.name != "ctx_callback" or pkg.filepath is None:
            return
        source = pkg.filepath.read_text(encoding="utf-8") if not isinstance(pkg.filepath, list) else ""
        for name, module in lazy_exports(source).items():
            if name not in pkg.members:
                pkg.set_member(name, Alias(name, f"{pkg.path}.{module}.{name}", parent=pkg))


#: ``:role:`target``` or ``:role:`~target```, the Sphinx cross-reference roles the docstrings use.
SPHINX_ROLE = re.compile(r":(?:class|func|meth|attr|data|mod|exc|obj):`(~?)([^`]+)`")


def sphinx_roles_as_code(text: str) -> str:
    """``:class:`~a.b.C``` -> ```C```, ``:func:`a.f``` -> ```a.f```: what Sphinx would print, as inline code."""
    return SPHINX_ROLE.sub(lambda m: "``" + (m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2)) + "``", text)


class SphinxRolesAsCode(Extension):
    """Rewrite Sphinx roles in every docstring of the package as inline code before they are rendered."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = sphinx_roles_as_code(obj.docstring.value)
