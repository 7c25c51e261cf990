"""MkDocs hook: the package's docstrings use Sphinx roles (``:class:`X```); the API
reference shows just the code span ``X``."""

from __future__ import annotations

import re
from typing import Any

ROLE = re.compile(r":(?:class|meth|func|attr|exc|data|mod|obj):(?=<code)")


def on_page_content(html: str, **kwargs: Any) -> str:
    return ROLE.sub("", html)
