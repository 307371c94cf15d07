"""The README stays short and its links resolve; the API reference's griffe extensions do what they say.

The documentation site itself is checked by ``mkdocs build --strict`` in ``.ci/run`` (links, anchors, API references).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LINK = re.compile(r"\]\(([^)\s]+)\)")


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file (lower case, punctuation dropped, spaces to -)."""
    anchors, in_code = set(), False
    for line in markdown.split("\n"):
        if line.startswith("```"):
            in_code = not in_code
        heading = None if in_code else re.match(r"^#{1,6} (.+)", line)
        if heading:
            anchors.add(re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-"))
    return anchors


def test_readme_is_at_most_250_lines():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 250


def test_readme_links_resolve_to_files_and_headings():
    broken = []
    for link in LINK.findall(README.read_text(encoding="utf-8")):
        if link.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = link.partition("#")
        target = ROOT / path if path else README
        if not target.is_file():
            broken.append(f"{link}: no file {target.relative_to(ROOT)}")
        elif anchor and anchor not in github_anchors(target.read_text(encoding="utf-8")):
            broken.append(f"{link}: no heading with anchor #{anchor}")
    assert not broken, "README links that do not resolve:\n" + "\n".join(broken)


def _extensions():
    spec = importlib.util.spec_from_file_location("griffe_extensions", ROOT / "docs" / "griffe_extensions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_public_name_is_a_lazy_export_the_api_reference_can_find():
    import ctx_callback

    exports = _extensions().lazy_exports((ROOT / "ctx_callback" / "__init__.py").read_text(encoding="utf-8"))
    assert set(exports) == set(ctx_callback.__all__)


def test_sphinx_roles_become_inline_code_as_sphinx_prints_them():
    roles_as_code = _extensions().sphinx_roles_as_code
    assert roles_as_code("raises :class:`~ctx_callback.errors.ConfigurationError`.") == "raises ``ConfigurationError``."
    assert roles_as_code("see :func:`ctx_callback.load_probes`") == "see ``ctx_callback.load_probes``"
    assert roles_as_code("plain ``code`` stays") == "plain ``code`` stays"
