"""MkDocs hook: replace ``<!-- settings-table -->`` with a table generated from
:class:`fastapi_sse.SSESettings`, so the documented settings cannot drift."""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel

from fastapi_sse.settings import ENV_PREFIX, SSESettings

MARKER = "<!-- settings-table -->"


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return " \\| ".join(f"`{value}`" for value in typing.get_args(annotation))
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return " \\| ".join(_type_name(arg) for arg in typing.get_args(annotation))
    return f"`{getattr(annotation, '__name__', str(annotation))}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 10_000:
        return f"{value:_}"  # 262_144, as the keyword takes it
    return str(value)


def _rows(model: type[BaseModel], prefix: str, keyword: str = "") -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        env = f"{prefix}{name.upper()}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            # A nested section is reached through a double underscore (SSE_REDIS__URL).
            rows += _rows(annotation, env + "__", f"{keyword}{name}.")
            continue
        default = _default(field.get_default(call_default_factory=True))
        description = _cell(field.description or "")
        rows.append(f"| `{env}` | `{keyword}{name}` | {_type_name(annotation)} | `{_cell(default)}` | {description} |")
    return rows


def settings_table() -> str:
    """The Markdown table: environment variable, keyword of SSESettings, type, default, description."""
    header = [
        "| Environment variable | Keyword | Type | Default | Description |",
        "|---|---|---|---|---|",
    ]
    return "\n".join(header + _rows(SSESettings, ENV_PREFIX))


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, settings_table())
    return markdown
