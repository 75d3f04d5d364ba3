"""MkDocs hooks: the README as the home page, and every example script as a
page of its own.

The README links into `docs/` (so that its links work on GitHub); on the
home page those links are made relative to `docs/` again, and its links to
the repository's other files point to them on GitHub. An example script
is a module docstring with `Title:` and `Description:` lines, then code
with module-level strings of Markdown between it: each string becomes
prose, each stretch of code a Python block. Nothing is written to `docs/`.
"""

import ast
import inspect
import logging
import pathlib
import re

from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.keras_bn")

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
# A helper module the examples import, not an example.
NOT_EXAMPLES = {"common.py"}
HEADER_KEYS = ("Title", "Description")
HEADER_LINE = re.compile(r"^(?P<key>[A-Z][A-Za-z ]*): ?(?P<value>.*)$")
# A link of the README to a file of the repository: `](docs/x.md)`,
# `](./LICENSE)`; not `](https://...)` or `](#anchor)`.
README_LINK = re.compile(
    r"\]\((?!https?://|mailto:|#)(?:\./)?(?P<path>[^)\s]+)\)"
)


def on_files(files, config):
    for script in sorted(EXAMPLES.glob("*.py")):
        if script.name in NOT_EXAMPLES:
            continue
        files.append(
            File.generated(
                config,
                f"examples/{script.stem}.md",
                content=example_page(script, config["repo_url"]),
            )
        )
    return files


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri != "index.md":
        return markdown
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blob = f"{config['repo_url'].rstrip('/')}/blob/main/"

    def link(match):
        path = match["path"]
        if path.startswith("docs/"):
            return f"]({path.removeprefix('docs/')})"
        return f"]({blob}{path})"

    return README_LINK.sub(link, readme)


def example_page(script, repo_url):
    """The Markdown page of an example script."""
    source = script.read_text(encoding="utf-8")
    module = ast.parse(source)
    lines = source.splitlines()
    header = ast.get_docstring(module, clean=True)
    if header is None:
        log.warning("%s has no header docstring", _relative(script))
        header = ""
    fields, body = _split_header(header)
    for key in HEADER_KEYS:
        if key not in fields:
            log.warning(
                "The header of %s has no '%s:' line", _relative(script), key
            )
    url = f"{repo_url.rstrip('/')}/blob/main/{_relative(script)}"
    parts = [
        f"# {fields.get('Title', script.stem)}",
        f"*{fields.get('Description', '')}*",
        f"[`{_relative(script)}`]({url}): the whole script, to copy.",
        body,
    ]
    body_nodes = module.body[1:] if header else module.body
    # Line numbers from 1; the code starts after the header.
    code_start = module.body[0].end_lineno + 1 if header else 1
    for node in body_nodes:
        if _is_prose(node):
            parts.append(_code_block(lines[code_start - 1 : node.lineno - 1]))
            parts.append(inspect.cleandoc(node.value.value))
            code_start = node.end_lineno + 1
    parts.append(_code_block(lines[code_start - 1 :]))
    return "\n\n".join(part for part in parts if part) + "\n"


def _split_header(docstring):
    """The `Key: value` lines at the top of a docstring (a value may go on
    over the next lines, up to a blank line or the next key), and the rest."""
    fields, key = {}, None
    lines = docstring.splitlines()
    for index, line in enumerate(lines):
        match = HEADER_LINE.match(line)
        if not line.strip():
            return fields, "\n".join(lines[index + 1 :]).strip()
        if match and match["key"] in HEADER_KEYS:
            key = match["key"]
            fields[key] = match["value"].strip()
        elif key is None:
            return fields, "\n".join(lines[index:]).strip()
        else:
            fields[key] += " " + line.strip()
    return fields, ""


def _is_prose(node):
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    )


def _code_block(lines):
    code = "\n".join(lines).strip("\n")
    if not code.strip():
        return ""
    return f"```python\n{code}\n```"


def _relative(path):
    return path.relative_to(ROOT).as_posix()
