"""The service configuration reference, generated from the pydantic models of `config`: every key with its type,
default and meaning (a field's description, else the comment on its line). `python -m learned_router.tools.configdoc`
prints it; serving/CONFIG.md is its output, and a test keeps the two equal."""

from __future__ import annotations

import ast
import inspect
import io
import json
import re
import tokenize
import types
import typing
from functools import cache

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from ..serving.config import ServiceConfig

HEADER = """# Service configuration reference

Every key of the YAML file `learned-router serve --config` reads (examples: [config.example.yaml](config.example.yaml),
[config.tiers.example.yaml](config.tiers.example.yaml)). Unknown keys and wrong types are refused at start-up with a
line naming the key. A relative file path is from the config file's folder, whatever the working directory.
Generated from `src/learned_router/serving/config.py` by `python -m learned_router.tools.configdoc > serving/CONFIG.md`:
do not edit by hand.
"""
BOUNDS = {annotated_types.Gt: ">", annotated_types.Ge: ">=", annotated_types.Lt: "<", annotated_types.Le: "<="}


@cache
def comments(model: type[BaseModel]) -> dict[str, str]:
    """Field name -> the comment on its line(s) in the class source."""
    source = inspect.getsource(model)
    notes: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            notes[tok.start[0]] = tok.string.lstrip("# ").strip()
    body = ast.parse(source).body[0].body
    return {
        node.target.id: " ".join(notes[i] for i in range(node.lineno, node.end_lineno + 1) if i in notes)
        for node in body
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
    }


def model_of(kind) -> type[BaseModel] | None:
    """The model a field holds (itself, in a list or optional), if any."""
    for k in (kind, *typing.get_args(kind)):
        if isinstance(k, type) and issubclass(k, BaseModel):
            return k
        if typing.get_origin(k) is list and (inner := model_of(typing.get_args(k)[0])):
            return inner
    return None


def anchor(path: str) -> str:
    """GitHub's anchor of a `## path` heading."""
    return "#" + re.sub(r"[^a-z0-9 _-]", "", path.lower()).replace(" ", "-")


def type_name(kind, path: str) -> str:
    """A field's type in words; a section links to its own table."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_name(a, path) for a in args)
    if origin is typing.Annotated:
        return type_name(args[0], path)
    if origin is list:
        return f"list of {type_name(args[0], path + '[]')}"
    if origin is dict:
        return f"map of {type_name(args[0], path)} to {type_name(args[1], path)}"
    if isinstance(kind, type) and issubclass(kind, BaseModel):
        return f"[section]({anchor(path)})"
    return getattr(kind, "__name__", str(kind))


def bounds(field: FieldInfo) -> str:
    parts = [
        f"{op} {getattr(m, next(iter(m.__dataclass_fields__)))}"
        for m in field.metadata
        for cls, op in BOUNDS.items()
        if isinstance(m, cls)
    ]
    parts += [f"length {m.min_length}+" for m in field.metadata if isinstance(m, annotated_types.MinLen)]
    parts += [f"length <= {m.max_length}" for m in field.metadata if isinstance(m, annotated_types.MaxLen)]
    return f" ({', '.join(parts)})" if parts else ""


def default_of(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    return "its keys' defaults" if isinstance(value, BaseModel) else f"`{json.dumps(value)}`"


def sections(model: type[BaseModel], path: str) -> list[tuple[str, type[BaseModel]]]:
    """(key path, model) of `model` and of every section under it, depth first."""
    out = [(path, model)]
    for name, field in model.model_fields.items():
        if inner := model_of(field.annotation):
            list_of = typing.get_origin(field.annotation) is list
            out += sections(inner, f"{path}.{name}{'[]' if list_of else ''}".lstrip("."))
    return out


def first_line(model: type[BaseModel] | None) -> str:
    """A section's docstring up to its first full stop: its meaning in the table above it."""
    return inspect.cleandoc(model.__doc__).split(". ")[0].replace("\n", " ") if model and model.__doc__ else ""


def render() -> str:
    lines = [HEADER]
    for path, model in sections(ServiceConfig, ""):
        notes = comments(model)
        lines += [f"## {path or 'top level'}", ""]
        if model.__doc__:
            lines += [inspect.cleandoc(model.__doc__), ""]
        lines += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for name, field in model.model_fields.items():
            meaning = field.description or notes.get(name) or first_line(model_of(field.annotation))
            kind = type_name(field.annotation, f"{path}.{name}".lstrip("."))
            lines.append(f"| `{name}` | {kind}{bounds(field)} | {default_of(field)} | {meaning} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
