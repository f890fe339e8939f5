"""Griffe extension for the API pages: reST literal-block markers in docstrings, rendered as Markdown reads them.

Some docstrings introduce a code block the reStructuredText way, ``...the weights::`` followed by a blank line and
an indented block. Markdown already shows the indented block as code; this turns the ``::`` that introduces it into
``:`` so the page does not print it. The docstrings themselves stay as they are (they are read in editors too).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_INTRO = re.compile(r"(?<=\S)::[ \t]*$", re.M)  # "the weights::" -> "the weights:"
_ALONE = re.compile(r"^([ \t]*)::[ \t]*$", re.M)  # a line holding only "::" -> an empty line


class RestLiteralBlocks(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ALONE.sub(r"\1", _INTRO.sub(":", obj.docstring.value))
