"""The documentation site builds with `mkdocs build --strict`: a broken link
or anchor, an API reference that does not resolve, or an example script
without a `Title:` and `Description:` header fails it. Every name the
package exports has its entry in the API reference, and every example
script its page.

mkdocstrings reads the package's source (griffe), without importing it or
Keras: the build takes a few seconds.
"""

import ast
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = sorted(
    script.stem
    for script in (ROOT / "examples").glob("*.py")
    if script.name != "common.py"
)


def _module(path):
    return ast.parse((ROOT / path).read_text(encoding="utf-8"))


def _exported():
    """The names in `keras_bn.__all__`, with each public class of an
    exported module (`callbacks`) under its module's name."""
    (names,) = [
        node.value
        for node in _module("keras_bn/__init__.py").body
        if isinstance(node, ast.Assign)
        and [target.id for target in node.targets] == ["__all__"]
    ]
    exported = []
    for name in ast.literal_eval(names):
        module = ROOT / "keras_bn" / f"{name}.py"
        if not module.is_file():
            exported.append(f"keras_bn.{name}")
            continue
        exported += [
            f"keras_bn.{name}.{node.name}"
            for node in _module(module).body
            if isinstance(node, ast.ClassDef | ast.FunctionDef)
            and not node.name.startswith("_")
        ]
    return exported


def test_site_builds_strict(tmp_path):
    site = tmp_path / "site"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--site-dir",
            str(site),
        ],
        env={
            **os.environ,
            "NO_MKDOCS_2_WARNING": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
        },
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]

    api = "".join(
        page.read_text(encoding="utf-8")
        for page in (site / "api").glob("*/index.html")
    )
    for name in _exported():
        assert f'id="{name}"' in api, f"{name} is not in the API reference"
    # Keras's docstring sections, as the docs' griffe extension reads them.
    assert "Call arguments:</span>" in api
    assert "Reference:</span>" in api

    for name in EXAMPLES:
        page = site / "examples" / name / "index.html"
        assert page.is_file(), f"examples/{name}.py has no page"
        assert '<div class="highlight">' in page.read_text(encoding="utf-8")

    home = (site / "index.html").read_text(encoding="utf-8")
    assert 'id="why"' in home, "the home page is not the README"
