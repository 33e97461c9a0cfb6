"""Griffe extension for the API reference (mkdocs.yml): the docstrings' Sphinx markup, rendered.

The docstrings are numpy style, but cross-reference with Sphinx roles (``:func:`msign```) and
document module constants with ``#:`` comments above them. mkdocstrings would show the roles
literally and ignore the comments; this turns each role into a code span and each ``#:`` block
into its attribute's docstring. It changes the built site only, never the package.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(
    r":(?:py:)?(?:func|meth|class|mod|attr|data|exc|obj|const|ref|term):`(~?)([^`]+)`"
)


def _code_span(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    title = re.fullmatch(r"(.+?)\s*<[^>]+>", target)
    if title:
        target = title.group(1)
    elif tilde:
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


def sphinx_roles_to_code(text: str) -> str:
    """``:func:`x``` → ```x```, ``:class:`~a.B``` → ```B```, ``:ref:`t <x>``` → ```t```."""
    return _ROLE.sub(_code_span, text)


class SphinxMarkup(griffe.Extension):
    """Sphinx roles → code spans; ``#:`` comments → attribute docstrings."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:  # noqa: D102
        if obj.docstring is not None:
            obj.docstring.value = sphinx_roles_to_code(obj.docstring.value)

    def on_attribute_instance(  # noqa: D102
        self, *, attr: griffe.Attribute, agent: Any, **kwargs: Any
    ) -> None:
        if attr.docstring is not None or not attr.lineno or attr.filepath is None:
            return
        try:
            lines = attr.lines_collection[attr.filepath]
        except KeyError:
            return
        comment: list[str] = []
        i = attr.lineno - 2
        while i >= 0 and lines[i].lstrip().startswith("#:"):
            comment.insert(0, lines[i].lstrip()[2:].strip())
            i -= 1
        if comment:
            attr.docstring = griffe.Docstring(
                sphinx_roles_to_code("\n".join(comment)),
                lineno=i + 2,
                endlineno=attr.lineno - 1,
                parent=attr,
                parser=getattr(agent, "docstring_parser", None),
                parser_options=getattr(agent, "docstring_options", None),
            )
