"""One way to explain a pydantic ValidationError: one line naming the file, the line and the field.

The job spec (`trainers/spec.py`: the whole spec and its tune / k8s sections), the serve YAML and the HTTP
API's request bodies all validate with pydantic; all of them turn its errors into the same words here:
`explain(e)` gives (field path, message), `one_line(e, source, text)` gives `source:line: field: message`.
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from trainers.errors import SpecError

# Union members appear in pydantic's paths as e.g. `function-before[...]`, `literal['auto']` or `int`:
# they are not fields the user wrote.
_TYPE_TAGS = {"int", "float", "str", "bool", "none", "list", "dict"}


def _is_field(part: Any) -> bool:
    return not (isinstance(part, str) and ("[" in part or part in _TYPE_TAGS))


def explain(
    error: ValidationError, model: type[BaseModel] | None = None, data: Any = None
) -> tuple[tuple[str | int, ...], str]:
    """(field path, message) for the first problem, with `(+N more problems)` when there are more. `model`
    and `data` (what was validated) let an unknown field name the allowed ones and the closest match."""
    errors = error.errors()
    loc, msg = _explain_one(errors[0], model, data)
    more = len(errors) - 1
    return loc, msg + (f" (+{more} more problem{'s' if more > 1 else ''})" if more else "")


def _explain_one(
    err: dict[str, Any], model: type[BaseModel] | None, data: Any
) -> tuple[tuple[str | int, ...], str]:
    raw = tuple(err["loc"])
    loc = tuple(p for p in raw if _is_field(p))
    # A discriminated union puts its tag (`lora`, `sft`) into the path after the field: drop it.
    section = data.get(loc[0]) if isinstance(data, dict) and loc else None
    if len(loc) >= 2 and isinstance(section, dict) and section.get("kind") == loc[1]:
        loc = (loc[0], *loc[2:])
    kind = err["type"]
    text = str(err.get("msg", "")).removeprefix("Value error, ")
    if kind == "finite_number":
        return loc, f"{err.get('input')!r} is not a finite number; give a finite value"
    if kind == "value_error" and "boolean" in text:
        return loc, text + "; write a number"
    if kind == "extra_forbidden":
        field = str(loc[-1]) if loc else "?"
        allowed = sorted(fields_at(model, loc[:-1], data) or []) if model is not None else []
        hint = difflib.get_close_matches(field, allowed, n=1)
        msg = f"unknown field `{field}`"
        if loc[:1] == ("method",) and len(loc) == 2 and isinstance(data, dict):
            msg += f" for method `{(data.get('method') or {}).get('kind')}`"
        if allowed:
            msg += f"; allowed: {', '.join(allowed)}"
        if hint:
            msg += f"; did you mean `{hint[0]}`?"
        return loc, msg
    if kind == "missing":
        return loc, "required field is missing"
    if kind == "union_tag_invalid":
        tag = err["input"].get("kind") if isinstance(err.get("input"), dict) else err.get("input")
        return (*loc, "kind"), f"unknown kind {tag!r}; choose one of {err['ctx']['expected_tags']}"
    if kind == "union_tag_not_found":
        return (*loc, "kind"), "`kind` is missing"
    return loc, f"{text} (got {_shown(err.get('input'))})"


def _shown(value: Any, limit: int = 80) -> str:
    """The offending value, cut short: a 1 MB string does not belong in an error line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def fields_at(model: type[BaseModel] | None, loc: tuple[Any, ...], data: Any = None) -> list[str] | None:
    """Field names of the (nested) model at `loc`; a union of models is resolved by the data's `kind`."""
    node = data
    for part in loc:
        if model is None:
            return None
        field = model.model_fields.get(str(part))
        node = node.get(part) if isinstance(node, dict) else None
        model = _model_of(field.annotation, node) if field else None
    return list(model.model_fields) if model is not None else None


def _model_of(annotation: Any, node: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _model_of(typing.get_args(annotation)[0], node)
    if origin in (typing.Union, types.UnionType):
        members = [_model_of(a, node) for a in typing.get_args(annotation)]
        models = [m for m in members if m is not None]
        kind = node.get("kind") if isinstance(node, dict) else None
        for m in models:
            default = m.model_fields.get("kind")
            if default is not None and kind is not None and default.default == kind:
                return m
            tags = typing.get_args(default.annotation) if default is not None else ()
            if kind is not None and kind in tags:
                return m
        return models[0] if len(models) == 1 else None
    return None


# --------------------------------------------------------------------------- where in the file
def key_lines(text: str) -> dict[tuple[str | int, ...], int]:
    """Map each key path in the YAML text to its 1-based line, for error messages."""
    lines: dict[tuple[str | int, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str | int, ...]) -> None:
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                lines[(*path, str(key.value))] = key.start_mark.line + 1
                walk(value, (*path, str(key.value)))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*path, i))

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def line_for(lines: dict[tuple[str | int, ...], int], loc: tuple[str | int, ...]) -> int | None:
    """The line of the deepest key of `loc` that the file has."""
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines and (end or len(lines) == 1):
            return lines[loc[:end]]
    return None


def located(source: str, text: str | None, loc: tuple[str | int, ...], msg: str) -> str:
    """`source:line: field.path: msg`, the line found from the YAML text when there is one."""
    line = line_for(key_lines(text), loc) if text else None
    where = f"{source}:{line}" if line else source
    field = ".".join(str(p) for p in loc)
    return f"{where}: {field}: {msg}" if field else f"{where}: {msg}"  # (the whole file: no field)


def one_line(
    error: ValidationError,
    source: str,
    text: str | None = None,
    *,
    prefix: tuple[str | int, ...] = (),
    model: type[BaseModel] | None = None,
    data: Any = None,
) -> str:
    """The whole explanation of a ValidationError: `source:line: field: message`. `prefix` is where the
    validated data sits in the file (("tune",) for the spec's tune section); `model` and `data` give the
    allowed fields of an unknown one."""
    loc, msg = explain(error, model, data)
    return located(source, text, (*prefix, *loc), msg)


def spec_error(
    error: ValidationError,
    source: str,
    text: str | None = None,
    *,
    prefix: tuple[str | int, ...] = (),
    model: type[BaseModel] | None = None,
    data: Any = None,
) -> SpecError:
    """`one_line` as the SpecError the CLI prints (exit 2)."""
    return SpecError(one_line(error, source, text, prefix=prefix, model=model, data=data))
