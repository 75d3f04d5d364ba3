"""A griffe extension that reads docstrings written as Keras writes them.

Griffe's Google-style parser knows "Args:", "Returns:" and "Raises:", but
not these habits of Keras's docstrings, which keras-bn's follow:

- "Call arguments:", the arguments of `call`, listed as "Args:" lists the
  constructor's: read into a list of arguments of its own;
- "Example:" followed by a blank line and an unindented doctest: read as
  an example section, its code highlighted;
- "Reference:", a list of papers, and "Returns:" written as a sentence:
  sections with the same heading as the others, not a note box or a list
  of unnamed values.

Sections are headed as Keras's docstrings head them ("Args:", not
"Parameters:").
"""

import re
import textwrap
from functools import cached_property

import griffe

# "Example:", a blank line, then lines of a doctest up to a blank line.
EXAMPLE = re.compile(
    r"^(?P<indent> *)Examples?:\n\n"
    r"(?P<code>(?P=indent)>>> .*(?:\n(?P=indent)\S.*)*)",
    re.MULTILINE,
)
TITLES = {
    griffe.DocstringSectionKind.parameters: "Args:",
    griffe.DocstringSectionKind.returns: "Returns:",
    griffe.DocstringSectionKind.raises: "Raises:",
    griffe.DocstringSectionKind.examples: "Example:",
}


class KerasDocstrings(griffe.Extension):
    def on_instance(self, *, obj, **kwargs):
        docstring = obj.docstring
        if docstring is not None and not isinstance(docstring, _Docstring):
            obj.docstring = _Docstring(
                docstring.value,
                lineno=docstring.lineno,
                endlineno=docstring.endlineno,
                parent=docstring.parent,
                parser=docstring.parser,
                parser_options=docstring.parser_options,
            )


class _Docstring(griffe.Docstring):
    @cached_property
    def parsed(self):
        keras_form = griffe.Docstring(
            EXAMPLE.sub(_indented_example, self.value),
            lineno=self.lineno,
            endlineno=self.endlineno,
            parent=self.parent,
            parser=self.parser,
            parser_options=self.parser_options,
        )
        return [_section(section, self) for section in keras_form.parse()]


def _indented_example(match):
    indent = match["indent"]
    code = textwrap.indent(textwrap.dedent(match["code"]), indent + "    ")
    return f"{indent}Examples:\n{code}"


def _section(section, docstring):
    if section.kind is griffe.DocstringSectionKind.admonition:
        kind = section.value.kind
        if kind == "call-arguments":
            return _call_arguments(section.value.contents, docstring)
        if kind in ("reference", "references"):
            return _titled_text(f"{section.title}:", section.value.contents)
        return section
    if section.kind is griffe.DocstringSectionKind.returns and not any(
        item.name or item.annotation for item in section.value
    ):
        # Keras's "Returns:" is prose: no name, no type to list it by.
        return _titled_text(
            section.title or "Returns:",
            "\n\n".join(item.description for item in section.value),
        )
    if section.title is None and section.kind in TITLES:
        section.title = TITLES[section.kind]
    return section


def _titled_text(title, markdown):
    """Markdown under a heading styled as the other sections' headings."""
    return griffe.DocstringSectionText(
        f'<p><span class="doc-section-title">{title}</span></p>\n\n{markdown}'
    )


def _call_arguments(contents, docstring):
    """A "Call arguments:" list, read as griffe reads "Args:"."""
    options = dict(docstring.parser_options, warn_unknown_params=False)
    # A first line of its own: the Docstring dedents the lines after it.
    arguments = griffe.Docstring(
        "\nArgs:\n" + textwrap.indent(contents, "    "),
        parser=docstring.parser,
        parser_options=options,
    ).parse()[0]
    arguments.title = "Call arguments:"
    return arguments
