"""Sphinx configuration for the crown_sync docs: ``tox -e docs`` (warnings are errors)."""

import os
import re
import sys

from sphinx.util.matching import patfilter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# autodoc imports crown_sync from this checkout, installed or not.
sys.path.insert(0, ROOT)


def _version():
    """``__version__`` from crown_sync/__init__.py, the one place it is written (setup.cfg reads
    it from there too)."""
    with open(os.path.join(ROOT, "crown_sync", "__init__.py"), encoding="utf-8") as handle:
        return re.search(r'^__version__ = "([^"]+)"', handle.read(), re.M).group(1)


project = "crown_sync"
author = "crown_sync contributors"
copyright = "crown_sync contributors"
release = _version()
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]

root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path = []

autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_typehints = "signature"
autoclass_content = "both"

html_theme = "alabaster"
html_title = f"crown_sync {release}"
html_static_path = []


# index.rst lists pages by glob pattern, so that a new page joins the toctree by itself. Sections
# are optional (a project may have no integrations page), but Sphinx warns about a pattern that
# matches nothing (a warning not every Sphinx version lets us suppress), and a catch-all pattern
# would also swallow pages named explicitly further down (api, last). So expand the patterns of
# the root document's toctree here, in order, with Sphinx's own matcher: each page once, pages
# named explicitly keep their place, a pattern that matches nothing disappears. A page in a folder
# with its own index page (docs/oracles/index.rst) is left to that index's toctree.
_GLOB = re.compile(r".*[*?\[].*")


def _toctree_entries(lines):
    """(index, entry) for every entry line of every toctree in ``lines``."""
    in_toctree = False
    for index, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith(".. toctree::"):
            in_toctree = True
        elif in_toctree and line[:1] not in (" ", "\t", "\n", "\r", ""):
            in_toctree = False
        elif in_toctree and stripped and not stripped.startswith(":"):
            yield index, stripped


def _has_own_index(docname, found):
    parts = docname.split("/")
    return any(
        "/".join(parts[:depth] + ["index"]) in found and parts[depth:] != ["index"]
        for depth in range(1, len(parts))
    )


def _expand_toctree_globs(app, docname, source):
    if docname != root_doc:
        return
    lines = source[0].splitlines(keepends=True)
    entries = list(_toctree_entries(lines))
    explicit = {entry for _, entry in entries if not _GLOB.match(entry)}
    found = set(app.env.found_docs)
    remaining = {
        name for name in found - {root_doc} - explicit if not _has_own_index(name, found)
    }
    for index, entry in entries:
        if _GLOB.match(entry):
            matched = sorted(patfilter(remaining, entry))
            remaining.difference_update(matched)
            indent = lines[index][: len(lines[index]) - len(lines[index].lstrip())]
            lines[index] = "".join(f"{indent}{name}\n" for name in matched)
    source[0] = "".join(lines)


# Docstrings in this project list options and fields as ``name: text`` lines, continued on
# deeper-indented lines. That is not reStructuredText (docutils warns "unexpected indentation"),
# so a paragraph made only of such items becomes a definition list, which renders as intended.
_ITEM = re.compile(r"^([A-Za-z_]\w*(?:, [A-Za-z_]\w*)*): (\S.*)$")


def _name_lists_to_definitions(app, what, name, obj, options, lines):
    start = 0
    while start < len(lines):
        end = start
        while end < len(lines) and lines[end].strip():
            end += 1
        block = lines[start:end]
        items = [i for i, line in enumerate(block) if _ITEM.match(line)]
        if (
            len(items) >= 2
            and items[0] == 0
            and all(i in items or block[i][:1].isspace() for i in range(len(block)))
        ):
            converted = []
            for i, line in enumerate(block):
                match = _ITEM.match(line) if i in items else None
                if match:
                    names = ", ".join(f"``{n.strip()}``" for n in match.group(1).split(","))
                    converted += [names, "    " + match.group(2)]
                else:
                    converted.append("    " + line.strip())
            lines[start:end] = converted
            end = start + len(converted)
        start = end + 1


def setup(app):
    app.connect("source-read", _expand_toctree_globs)
    app.connect("autodoc-process-docstring", _name_lists_to_definitions)
