"""The README and the documentation site stay true to the code (no mkdocs needed: CI builds the site separately).

- the README keeps its size limit, the three commands of the two-command setup, and links that resolve;
- every public name of `sema_hf` has an entry (a ``::: sema_hf.<name>`` directive) in the API reference pages;
- every page the mkdocs nav names exists;
- every test the guide names still exists in the test file it links to;
- the SEMAConfig field table is generated from the dataclass: one row per field, with its default and help text.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest
import yaml

import sema_hf
from sema_hf import SEMAConfig

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
API_PAGES = sorted((DOCS / "api").glob("*.md"))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
THE_THREE_COMMANDS = ("bash install.sh", "accelerate launch examples/run_clm.py", "python -m pytest tests")


def _code_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```[a-z]*\n(.*?)^```", markdown, flags=re.S | re.M)


def test_readme_is_at_most_200_lines():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; the limit is 200 (details go into docs/)"


@pytest.mark.parametrize("command", THE_THREE_COMMANDS)
def test_readme_gives_each_setup_command_as_a_code_block_line(command):
    blocks = _code_blocks(README.read_text(encoding="utf-8"))
    assert any(command in block.splitlines() for block in blocks), f"no code block line is exactly {command!r}"


def test_every_relative_link_of_the_readme_resolves():
    text = README.read_text(encoding="utf-8")
    anchors = {_slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, fragment = target.partition("#")
        if not path:
            if fragment not in anchors:
                broken.append(target)
        elif not (ROOT / path).exists():
            broken.append(target)
        elif fragment and path.endswith(".md"):
            headings = re.findall(r"^#+ (.+)$", (ROOT / path).read_text(encoding="utf-8"), flags=re.M)
            if fragment not in {_slug(h) for h in headings}:
                broken.append(target)
    assert not broken, f"README links that do not resolve: {broken}"


def _slug(heading: str) -> str:
    """The anchor Python-Markdown's toc (and GitHub, for these headings) gives a heading."""
    text = re.sub(r"[`*]", "", heading).strip().lower()
    text = re.sub(r"[^\w\s-]", "", text)
    return re.sub(r"[\s]+", "-", text)


def test_every_public_name_has_an_api_reference_entry():
    directives = {
        match
        for page in API_PAGES
        for match in re.findall(r"^::: (sema_hf\.\S+)", page.read_text(encoding="utf-8"), re.M)
    }
    missing = [name for name in sema_hf.__all__ if f"sema_hf.{name}" not in directives]
    assert not missing, f"names in sema_hf.__all__ with no '::: sema_hf.<name>' in docs/api/*.md: {missing}"


def test_every_api_page_is_in_the_nav_and_every_nav_page_exists():
    nav = set(_pages(yaml.safe_load(_mkdocs_yml())["nav"]))
    assert nav, "no pages found in mkdocs.yml's nav"
    assert not [page for page in nav if not (DOCS / page).is_file()], "mkdocs.yml names pages that do not exist"
    unlisted = [p.relative_to(DOCS).as_posix() for p in API_PAGES if p.relative_to(DOCS).as_posix() not in nav]
    assert not unlisted, f"API pages missing from mkdocs.yml's nav: {unlisted}"


def _mkdocs_yml() -> str:
    return (ROOT / "mkdocs.yml").read_text(encoding="utf-8")


def _pages(nav) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [page for item in nav for page in _pages(item)]
    return [page for value in nav.values() for page in _pages(value)]


def _cited_tests() -> list[tuple[str, str, str]]:
    """(page, test name or pattern, test file) for each test a docs page names inside a link to its test file."""
    cited = []
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text(encoding="utf-8")
        for label, target in re.findall(r"\[([^\]]*)\]\(\.\./tests/(test_\w+\.py)\)", text):
            for name in re.findall(r"`(?:test_\w+\.py::)?(test_\w+\*?)`", label):
                if not name.endswith(".py"):
                    cited.append((page.name, name, target))
    return cited


def test_every_test_the_guide_names_exists_in_the_file_it_links_to():
    cited = _cited_tests()
    assert len(cited) >= 30, f"expected the Works-with tests among the cited ones, found {len(cited)}"
    missing = []
    for page, name, target in cited:
        source = (ROOT / "tests" / target).read_text(encoding="utf-8")
        pattern = re.escape(name[:-1]) + r"\w*" if name.endswith("*") else re.escape(name) + r"\b"
        if not re.search(r"def " + pattern + r"\(", source):
            missing.append(f"{page}: {name} in tests/{target}")
    assert not missing, f"tests named in the guide that do not exist: {missing}"


def _hook(name: str):
    spec = importlib.util.spec_from_file_location(f"_docs_hook_{name}", DOCS / "_hooks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_sema_config_table_has_one_row_per_field_with_its_default_and_help():
    table = _hook("sema_config_fields").field_table()
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    fields = dataclasses.fields(SEMAConfig)
    assert [row.split("`")[1] for row in rows] == [f.name for f in fields]
    for row, f in zip(rows, fields, strict=True):
        cells = [cell.strip() for cell in row.strip("|").split(" | ")]
        assert cells[2] == f"`{f.default!r}`", row
        assert f.metadata["help"].split()[0].strip("'`") in cells[3], row


def test_the_config_api_page_carries_the_generated_table_marker():
    page = (DOCS / "api" / "config.md").read_text(encoding="utf-8")
    assert _hook("sema_config_fields").MARKER in page
