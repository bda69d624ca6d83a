"""MkDocs hook: show Sphinx cross-reference roles in docstrings as plain code.

The docstrings use Sphinx fields and roles (``:class:`Message```, ``:meth:`put```), which
mkdocstrings renders as ``:meth:`` followed by the code span.  This hook drops the role
and, as Sphinx does, shows only the last component of a ``~``-prefixed name.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:py:)?(?:class|meth|func|mod|attr|exc|data|obj|const):<code>(~?)([^<]*)</code>")


def _plain(match: "re.Match[str]") -> str:
    name = match.group(2)
    if match.group(1):
        name = name.rsplit(".", 1)[-1]
    return f"<code>{name}</code>"


def on_page_content(html: str, **kwargs: Any) -> str:
    return _ROLE.sub(_plain, html)
