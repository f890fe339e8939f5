"""MkDocs hook: renders the `SEMAConfig` field table from the dataclass itself (one source, no hand copy).

A page writes the marker line ``<!-- sema-config-fields -->``; the hook replaces it with a table of
``dataclasses.fields(SEMAConfig)``: name, type, default, and the ``metadata["help"]`` text (plus its ``choices``).
``sema_hf/config.py`` (and ``selection.py``, which it imports) use only the standard library, so they are loaded
from their files under a stand-in package: the build imports neither torch nor transformers. A field without help text fails the build.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import sys
import types
from pathlib import Path

MARKER = "<!-- sema-config-fields -->"
PACKAGE_DIR = Path(__file__).resolve().parents[2] / "sema_hf"
_PACKAGE = "_sema_hf_for_docs"


def _load_config_class() -> type:
    # A stand-in package over sema_hf/ whose __init__ is not run: config.py and what it imports relatively
    # (selection.py, standard library only) load from their files, without torch or transformers.
    if _PACKAGE not in sys.modules:
        package = types.ModuleType(_PACKAGE)
        package.__path__ = [str(PACKAGE_DIR)]
        sys.modules[_PACKAGE] = package
    return importlib.import_module(f"{_PACKAGE}.config").SEMAConfig


def _escape(text: str) -> str:
    """Markdown-escape text outside `code spans` (help strings hold maths such as ``r*m`` and ``m**k``)."""
    parts = re.split(r"(`[^`]*`)", text)
    out = []
    for i, part in enumerate(parts):
        if i % 2:  # a code span: kept as written
            out.append(part)
        else:
            out.append(re.sub(r"([\\*_|<>\[\]])", r"\\\1", part))
    return "".join(out)


def _code(text: str) -> str:
    return f"`{text}`"


def _type(text: str) -> str:
    """``float | None`` as `float` or `None`: a "|" inside a code span would end the table cell."""
    return " or ".join(_code(part.strip()) for part in text.split("|"))


def field_table() -> str:
    config_class = _load_config_class()
    rows = ['<div class="config-fields" markdown>', "", "| field | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(config_class):
        help_text = f.metadata.get("help")
        if not help_text:
            raise ValueError(f"SEMAConfig.{f.name} has no metadata['help']: the generated field table needs one.")
        if f.default is not dataclasses.MISSING:
            default = _code(repr(f.default))
        elif f.default_factory is not dataclasses.MISSING:
            default = _code(repr(f.default_factory()))
        else:
            default = "required"
        type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        meaning = _escape(help_text)
        if "choices" in f.metadata:
            meaning += " One of " + ", ".join(_code(repr(c)) for c in f.metadata["choices"]) + "."
        rows.append(f"| `{f.name}` | {_type(type_name)} | {default} | {meaning} |")
    rows += ["", "</div>"]
    return "\n".join(rows)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, field_table())
