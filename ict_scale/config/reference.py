"""`--help-config`: every config key with its type, default and documentation, read from the schema itself.

A field's documentation is the comment after it in its dataclass (continued on comment-only lines below), so
the listing cannot drift from the schema: a new field appears here as soon as it is declared.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import textwrap
import tokenize
import typing

from .schema import Config


def field_docs(cls) -> dict[str, str]:
    """{field name: its comment} of dataclass `cls`, from its source."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    body = ast.parse(source).body[0].body
    fields = [(node.target.id, node.end_lineno) for node in body
              if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)]
    code_lines = {n for node in body for n in range(node.lineno, node.end_lineno + 1)}
    docs = {}
    for name, line in fields:
        parts = [comments[line]] if line in comments else []
        line += 1
        while line in comments and line not in code_lines:  # a comment-only line continues the one above
            parts.append(comments[line])
            line += 1
        docs[name] = " ".join(parts)
    return docs


def type_name(hint) -> str:
    """A field's type as a reader of YAML thinks of it: int, float, list of int, mapping, int or null."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        named = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(named) + (" or null" if type(None) in args else "")
    if origin in (list, tuple):
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if origin is typing.Literal:  # a closed set of values: their type here, the values in the field's comment
        return type(args[0]).__name__
    return getattr(hint, "__name__", str(hint))


def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def config_reference() -> str:
    """The listing printed by `python -m ict_scale.train --help-config`."""
    out = ["Every config key: `key: type = default` and what it does. Set one with key=value on the command line",
           "or in a YAML file (section: {key: value}).", ""]
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        out.append(f"{section.name}: {inspect.getdoc(cls).splitlines()[0]}")
        hints, docs = typing.get_type_hints(cls), field_docs(cls)
        for f in dataclasses.fields(cls):
            default = json.dumps(default_of(f))
            out.append(f"  {section.name}.{f.name}: {type_name(hints[f.name])} = {default}")
            if docs.get(f.name):
                out.append(f"      {docs[f.name]}")
        out.append("")
    return "\n".join(out)
