"""MkDocs hook: lets long code in table cells (test names, flags) wrap after ``_ . / ,`` instead of mid-word.

Only the text inside ``<code>`` within ``<td>`` cells changes (a ``<wbr>`` after each of those characters); a
``<wbr>`` is no character, so copying a test name out of the page still gives the name.
"""

from __future__ import annotations

import re

_CELL = re.compile(r"<td[^>]*>.*?</td>", re.S)
_CODE = re.compile(r"(<code[^>]*>)([^<]*)(</code>)")


_KEEP = '<div class="config-fields">'  # the generated SEMAConfig table keeps its names whole (extra.css: nowrap)


def _breakable(code: re.Match) -> str:
    return code.group(1) + re.sub(r"(?<=[^\s_])([_./,])(?=\w)", r"\1<wbr>", code.group(2)) + code.group(3)


def _cells(html: str) -> str:
    return _CELL.sub(lambda cell: _CODE.sub(_breakable, cell.group(0)), html)


def on_page_content(html: str, page, config, files) -> str:
    if _KEEP not in html:
        return _cells(html)
    before, _, rest = html.partition(_KEEP)
    table, _, after = rest.partition("</table>")
    return _cells(before) + _KEEP + table + "</table>" + on_page_content(after, page, config, files)
