"""The strict config base every config section in vlp derives from, and the one way a config
tree is validated: `validate(schema, tree, source)`.

An unknown key, a wrong type, NaN or infinity fails at load, before any work starts, as a
`ConfigError` naming the dotted key path (`model.heads.clipp: unknown key. Did you mean
"clip"?`); pydantic's `ValidationError` never leaves this module. Dotted overrides on a command
line (`train.steps=5`) are recognised here too (`OVERRIDE_WORD`, `parse_command_line`), so every
command that takes them (vlp's own CLI and `python -m vlp.train.segment_cli`) reads them alike.
"""

from __future__ import annotations

import argparse
import re
import types
import typing
from typing import Annotated, Any, TypeVar, Union

from pydantic import BaseModel, ConfigDict, ValidationError

from vlp.core.errors import ConfigError
from vlp.core.registry import nearest

M = TypeVar("M", bound=BaseModel)

# A command-line word that is a `dotted.key=value` override (vlp train CONFIG train.steps=5).
OVERRIDE_WORD = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """`parser.parse_args`, except that dotted overrides may come anywhere among the flags
    (`vlp train CONFIG --overwrite train.steps=5`), as people type them.

    argparse fills `overrides` (nargs="*") with the words right after CONFIG and leaves any later
    ones over; `parse_intermixed_args` would collect them but refuses subparsers. So: parse what
    is known, then take every leftover that looks like `key=value` as an override, in order,
    where the subcommand has overrides; anything else (an unknown flag) is still an error, exit 2."""
    args, leftovers = parser.parse_known_args(argv)
    if hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *(word for word in leftovers if OVERRIDE_WORD.match(word))]
        leftovers = [word for word in leftovers if not OVERRIDE_WORD.match(word)]
    if leftovers:
        parser.error(f"unrecognized arguments: {' '.join(leftovers)}")
    return args


class Strict(BaseModel):
    """A pydantic model that forbids unknown keys and non-finite numbers."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def validate(schema: type[M], tree: Any, source: str) -> M:
    """`schema.model_validate(tree)`, its errors as one `ConfigError` naming `source` (a file, or
    what the tree came from: "command line", "evals option") and each dotted key path."""
    try:
        return schema.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, schema, source)) from None


def strip_annotation(annotation: Any) -> Any:
    """Unwrap Annotated[...] and Optional[...] down to the annotation that matters."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif is_union(annotation):
            members = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(members) != 1:
                return annotation
            annotation = members[0]
        else:
            return annotation


def is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (Union, types.UnionType)


def resolve_location(schema: Any, loc: tuple) -> tuple[list[str], Any]:
    """Follow a pydantic error location through the schema.

    Returns the user-facing dotted parts (union tags such as `open_clip_vit` dropped) and the
    annotation reached, so an unknown key can be matched against the valid keys at its level.
    """
    annotation: Any = schema
    printed: list[str] = []
    for part in loc:
        annotation = strip_annotation(annotation)
        if is_union(annotation):
            members = [strip_annotation(m) for m in typing.get_args(annotation) if m is not type(None)]
            tagged = [
                m for m in members
                if isinstance(m, type) and issubclass(m, BaseModel) and "type" in m.model_fields
                and m.model_fields["type"].default == part
            ]
            annotation = tagged[0] if tagged else None
            continue  # a union tag, never a key the user wrote
        printed.append(str(part))
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(part) if isinstance(part, str) else None
            annotation = field.annotation if field else None
        elif typing.get_origin(annotation) in (list, tuple, dict):
            args = typing.get_args(annotation)
            annotation = args[-1] if args else None
        else:
            annotation = None
    return printed, strip_annotation(annotation)


def keys_at(annotation: Any) -> list[str]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return list(annotation.model_fields)
    return []


def format_validation_error(error: ValidationError, schema: type[BaseModel], source: str) -> str:
    """One line per problem: `source: dotted.key.path: what is wrong`, with the nearest valid
    key for an unknown key and the nearest valid name for an unknown tower/evaluator/format."""
    lines = []
    for item in error.errors():
        loc = tuple(item["loc"])
        printed, _ = resolve_location(schema, loc)
        path = ".".join(printed) or "(top level)"
        if item["type"] == "extra_forbidden":
            _, parent = resolve_location(schema, loc[:-1])
            lines.append(f"{source}: {path}: unknown key.{nearest(str(loc[-1]), keys_at(parent))}")
        elif item["type"] == "missing":
            lines.append(f"{source}: {path}: required key is missing")
        elif item["type"] == "union_tag_invalid":  # an unknown tower / evaluator name
            given, valid = str(item["ctx"]["tag"]), re.findall(r"'([^']*)'", str(item["ctx"]["expected_tags"]))
            lines.append(f"{source}: {path}: {item['msg']}.{nearest(given, valid)}")
        elif item["type"] == "literal_error":  # one of fixed names (a device, an export format)
            given, valid = str(item.get("input")), re.findall(r"'([^']*)'", str(item["ctx"]["expected"]))
            lines.append(f"{source}: {path}: {item['msg']} (got {item.get('input')!r}).{nearest(given, valid)}")
        else:
            message = item["msg"].removeprefix("Value error, ")
            value = item.get("input")
            if item["type"] == "value_error" and re.match(r"^[a-z_]+(\.[A-Za-z0-9_]+)+[ =:]", message):
                lines.append(f"{source}: {message}")  # the validator already names the key path(s)
                continue
            shown = f" (got {value!r})" if not isinstance(value, (dict, list)) and item["type"] != "value_error" else ""
            lines.append(f"{source}: {path}: {message}{shown}")
    return "\n".join(lines)
