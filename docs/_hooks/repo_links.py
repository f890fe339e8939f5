"""MkDocs hook: links from the guide to files of the repository outside ``docs/`` (tests, examples, bench).

The Markdown is written for the repository: ``[test](../tests/test_preemption.py)`` works when the page is read on
a code host. In the built site such a target does not exist, so this hook copies each linked file into the site as
a page of its own under ``source/`` (Python and configs as highlighted code, Markdown as a page) and points the link
there. A link to a repository file that does not exist fails the build, as a broken link inside ``docs/`` does
under ``mkdocs build --strict``. Links inside the copied Markdown (``examples/README.md``) are resolved the same way.
"""

from __future__ import annotations

import os
import posixpath
import re

from mkdocs.structure.files import File

SOURCE_DIR = "source"
_LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")
_LANGUAGES = {
    ".py": "python",
    ".yaml": "yaml",
    ".yml": "yaml",
    ".sh": "bash",
    ".json": "json",
    ".cfg": "ini",
    ".toml": "toml",
}

# virtual src_uri of a copied file -> its path in the repository
_copied: dict[str, str] = {}


def _repo_root(config) -> str:
    return os.path.dirname(os.path.abspath(config["config_file_path"]))


def _docs_prefix(config) -> str:
    return os.path.relpath(config["docs_dir"], _repo_root(config)).replace(os.sep, "/")


def _virtual(repo_path: str) -> str:
    return f"{SOURCE_DIR}/{repo_path}" if repo_path.endswith(".md") else f"{SOURCE_DIR}/{repo_path}.md"


def _page_location(src_uri: str, config) -> tuple[str, str]:
    """(the page's folder in the repository, its folder in the site's docs tree), both POSIX and relative."""
    virtual_dir = posixpath.dirname(src_uri)
    if src_uri in _copied:
        return posixpath.dirname(_copied[src_uri]), virtual_dir
    return posixpath.join(_docs_prefix(config), virtual_dir) if virtual_dir else _docs_prefix(config), virtual_dir


def _rewrite(target: str, src_uri: str, config, found: set[str] | None = None) -> str:
    if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#") or target.startswith("/"):
        return target
    path, _, fragment = target.partition("#")
    if not path:
        return target
    repo_dir, virtual_dir = _page_location(src_uri, config)
    repo_path = posixpath.normpath(posixpath.join(repo_dir, path))
    if repo_path.startswith("../"):
        return target  # outside the repository: mkdocs judges it
    docs = _docs_prefix(config)
    if repo_path == docs or repo_path.startswith(docs + "/"):
        inside = posixpath.relpath(repo_path, docs)
        folder = os.path.join(_repo_root(config), repo_path)
        if os.path.isdir(folder):
            index = next((n for n in ("index.md", "README.md") if os.path.isfile(os.path.join(folder, n))), None)
            if index is None and found is not None:
                # a folder of the docs without a page (docs/evidence/runs/): the site gets one listing its files
                found.add(repo_path + "/")
            inside = posixpath.join(inside, index or "index.md")
        elif src_uri not in _copied:
            return target  # a link inside docs/ from a page of docs/: mkdocs resolves and validates it
        new = posixpath.relpath(inside, virtual_dir or ".")
    else:
        full = os.path.join(_repo_root(config), repo_path)
        if not os.path.isfile(full):
            raise FileNotFoundError(f"{src_uri}: the link {target!r} points to {repo_path}, which does not exist")
        if found is not None:
            found.add(repo_path)
        new = posixpath.relpath(_virtual(repo_path), virtual_dir or ".")
        if not repo_path.endswith(".md"):
            fragment = ""  # code pages carry no anchors of their own
    return new + (f"#{fragment}" if fragment else "")


def _links(markdown: str, src_uri: str, config, found: set[str]) -> None:
    for match in _LINK.finditer(markdown):
        _rewrite(match.group(2), src_uri, config, found)


def _folder_index(repo_path: str, config) -> str:
    folder = os.path.join(_repo_root(config), repo_path)
    names = sorted(n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n)))
    lines = [f"# `{repo_path}/`", "", f"The {len(names)} files of this folder.", ""]
    lines += [f"- [{name}]({name})" for name in names]
    return "\n".join(lines) + "\n"


def _content(repo_path: str, config) -> str:
    with open(os.path.join(_repo_root(config), repo_path), encoding="utf-8") as f:
        text = f.read()
    if repo_path.endswith(".md"):
        return text
    fence = "~" * max(4, max((len(m) for m in re.findall(r"~+", text)), default=0) + 1)
    language = _LANGUAGES.get(os.path.splitext(repo_path)[1], "text")
    return f"# `{repo_path}`\n\nThe file as it is in the repository.\n\n{fence}{language}\n{text}\n{fence}\n"


def on_files(files, config):
    _copied.clear()
    pending: set[str] = set()
    for file in list(files.documentation_pages()):
        with open(file.abs_src_path, encoding="utf-8") as f:
            _links(f.read(), file.src_uri, config, pending)
    done: set[str] = set()
    while pending:
        repo_path = pending.pop()
        if repo_path in done:
            continue
        done.add(repo_path)
        if repo_path.endswith("/"):  # a folder of the docs: an index page inside it
            inside = posixpath.relpath(repo_path.rstrip("/"), _docs_prefix(config))
            files.append(File.generated(config, f"{inside}/index.md", content=_folder_index(repo_path[:-1], config)))
            continue
        virtual = _virtual(repo_path)
        _copied[virtual] = repo_path
        content = _content(repo_path, config)
        files.append(File.generated(config, virtual, content=content))
        if repo_path.endswith(".md"):
            more: set[str] = set()
            _links(content, virtual, config, more)
            pending |= more - done
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    src_uri = page.file.src_uri
    if src_uri in _copied and not _copied[src_uri].endswith(".md"):  # a code page: its text is code, not links
        return markdown
    return _LINK.sub(lambda m: m.group(1) + _rewrite(m.group(2), src_uri, config) + m.group(3), markdown)
