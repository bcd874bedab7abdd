"""Prints docs/spec.md's field tables from the JobSpec models, so the reference cannot drift.

python tools/spec_reference.py > docs/spec-fields.md
"""

from __future__ import annotations

import functools
import json
import operator
import types
import typing
from typing import Any

from pydantic import BaseModel, BeforeValidator
from pydantic_core import PydanticUndefined

from trainers import spec as s

SECTIONS: list[tuple[str, type[BaseModel]]] = [
    ("top level", s.JobSpec),
    ("model", s.ModelSpec),
    *((f"method: {kind}", cls) for kind, cls in s.METHOD_CLASSES.items()),
    *((f"objective: {kind}", cls) for kind, cls in s.OBJECTIVE_CLASSES.items()),
    ("data", s.DataSpec),
    ("data: a source (`data.train` / `data.eval` items)", s.DataSource),
    ("data: replay", s.ReplaySpec),
    ("train", s.TrainSpec),
    ("train: early_stopping", s.EarlyStoppingSpec),
    ("scaling", s.ScalingSpec),
    ("eval", s.EvalSpec),
    ("storage", s.StorageSpec),
    ("tracking", s.TrackingSpec),
]


def _plain(annotation: Any) -> Any:
    """The annotation without the spec's validator wrappers (Int, Float: numbers that refuse booleans)."""
    if typing.get_origin(annotation) is typing.Annotated and any(
        isinstance(m, BeforeValidator) for m in annotation.__metadata__
    ):
        return _plain(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return functools.reduce(operator.or_, [_plain(a) for a in typing.get_args(annotation)])
    return annotation


def type_name(annotation: Any) -> str:
    if "DataSource" in str(annotation) and "list" in str(annotation):  # data.train / data.eval
        return "source or list of sources" + (
            " \\| null" if str(annotation).startswith("typing.Optional") else ""
        )
    annotation = _plain(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    members = (
        typing.get_args(annotation)
        if typing.get_origin(annotation) in (typing.Union, types.UnionType)
        else ()
    )
    if len(members) == 2 and type(None) in members:  # an optional section (tracking)
        other = next(m for m in members if m is not type(None))
        if isinstance(other, type) and issubclass(other, BaseModel):
            return "section \\| null"
    if typing.get_origin(annotation) is typing.Annotated:
        return "section (by kind)"
    text = str(annotation).replace("typing.", "").replace("NoneType", "null")
    if "trainers.spec." in text:  # the method / objective unions
        return "section (by kind)"
    text = text.replace("<class '", "").replace("'>", "").replace("Union[", "").replace("Literal", "")
    return text.replace("]]", "]").replace("|", "\\|")


def default_of(field: Any) -> str:
    if field.default_factory is not None:
        if field.default_factory is dict:
            return "{}"
        return "(section defaults)" if field.default_factory is not list else "[]"
    if field.default is PydanticUndefined:
        return "**required**"
    return json.dumps(field.default)


def render() -> str:
    out = []
    for title, model in SECTIONS:
        out.append(f"### {title}\n")
        if model.__doc__ and model.__module__ == s.__name__ and model is not s.JobSpec:
            out.append(model.__doc__.strip().splitlines()[0] + "\n")
        out.append("| field | type | default | meaning |\n| --- | --- | --- | --- |")
        for name, field in model.model_fields.items():
            meaning = (field.description or ("Selects this variant." if name == "kind" else "")).replace(
                "|", "\\|"
            )
            out.append(f"| `{name}` | `{type_name(field.annotation)}` | {default_of(field)} | {meaning} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(render(), end="")
