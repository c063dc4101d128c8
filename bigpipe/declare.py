"""How a config key is declared (bigpipe.config), and a broken declaration as one line.

`key(...)` declares a key of a JSON object: its name, default, bounds, one line of
documentation, and what a SIGUSR1 reload does with it. pydantic validates against
the declarations; `problem` turns each of pydantic's errors into the line an
operator reads: the key path, what is wrong and how to fix it.
"""

from __future__ import annotations

import difflib
import enum
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, Literal, Self, TypeVar, get_args, get_origin

from annotated_types import Ge, Gt, Le
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationInfo
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, PydanticCustomError


class Reload(enum.Enum):
    """What a SIGUSR1 reload does with a changed value (bigpipe.node.reload)."""

    APPLIES = "applies"  # the running node takes the new value
    RESTART = "restart"  # the running value is kept; the log says a restart is needed
    REFUSED = "refused"  # the whole file is refused, the old config kept


@dataclass(frozen=True)
class Key:
    """What a declaration says besides its type and bounds: for reloads, errors and README."""

    reload: Reload = Reload.APPLIES
    unit: str = ""  # ms, bytes, seconds: for the README's type column
    kind: str = ""  # the README's type column, where the type alone says too little
    default_doc: str = ""  # a default that is no constant, e.g. `<topic>.<groupId>.dlq`
    hint: str = ""  # follows "is missing; add it"


@dataclass(frozen=True)
class Invalid:
    """The line for a value of the right type that breaks a constraint; {value} is its repr."""

    text: str


def key(alias: str, default: Any = ..., *, doc: str, invalid: str = "", **options: Any) -> Any:
    """A key: its JSON name, default (... when required), bounds, one line of doc, and Key's."""
    constraints = ("gt", "ge", "le", "min_length", "pattern")
    bounds = {name: options.pop(name) for name in constraints if name in options}
    info = Field(default, alias=alias, description=doc, **bounds)
    info.metadata += [Key(**options), *([Invalid(invalid)] if invalid else [])]
    return info


def check(test: Any, kind: str, text: str = "") -> Any:
    """A validator: the value if `test` passes it (or what `test` makes of it), else `kind`."""

    def validate(value: Any) -> Any:
        if (result := test(value)) is None:
            raise PydanticCustomError(kind, text)
        return result

    return validate


def rule(at: str, reason: str) -> PydanticCustomError:
    """A rule of one entry, broken at its key `at` ("" for the entry as a whole)."""
    return PydanticCustomError("rule", "{reason}", {"at": at, "reason": reason})


T = TypeVar("T")
# JSON's types as they are: "5" is no integer, true no number, 2.0 no integer.
Int = Annotated[int, Strict()]
Number = Annotated[float, Strict(), Field(allow_inf_nan=False)]
Text = Annotated[str, Strict()]
Flag = Annotated[bool, Strict()]
READING_A_FILE = {"reading": "a file"}  # the validation context of a config file


def _not_null(value: Any, info: ValidationInfo) -> Any:
    """In a file an absent key is None, and null no way to say so; Python may pass None."""
    if value is None and info.context == READING_A_FILE:
        raise PydanticCustomError("null", "")
    return value


Maybe = Annotated[T | None, BeforeValidator(_not_null)]
NonEmpty = Annotated[Text, Field(pattern=r"^\s*\S"), Invalid("must not be empty")]


class Section(BaseModel):
    """A JSON object of declared keys. Unknown keys are errors; values are frozen once read."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        validate_by_alias=True,
        validate_by_name=True,  # for objects built in Python; a file is read by alias only
        regex_engine="python-re",  # patterns may look ahead
    )

    def _derive(self, **values: Any) -> Self:
        """Fill in values worked out from others, from this section's own after-validator.
        Such a validator must return the instance it was given (pydantic warns about a
        copy), and the section is frozen: hence the bypass, for validators only."""
        for name, value in values.items():
            object.__setattr__(self, name, value)
        return self


@cache
def fields_of(model: type[Section]) -> dict[str, FieldInfo]:
    """A model's fields by JSON key, in declaration order."""
    return {info.alias or name: info for name, info in model.model_fields.items()}


def keys_of(model: type[Section], reload: Reload | None = None) -> dict[str, str]:
    """A model's attributes by the key an operator knows them by; or only those that reload so."""
    return {
        name: info.alias or name
        for name, info in model.model_fields.items()
        if reload is None or metadata(info, Key)[0].reload is reload
    }


def metadata(info: FieldInfo | None, kind: type) -> list[Any]:
    """The field's metadata of this kind: its own, then its type's (say, NonEmpty's)."""
    found = [item for item in (info.metadata if info else []) if isinstance(item, kind)]
    stack = [info.annotation] if info else []
    while stack:
        annotation = stack.pop()
        if get_origin(annotation) is Annotated:
            found += [item for item in annotation.__metadata__ if isinstance(item, kind)]
        stack += get_args(annotation)
    return found


def section_in(annotation: Any) -> type[Section] | None:
    """The section a field holds, itself or as its items."""
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return annotation
    return next(filter(None, map(section_in, get_args(annotation))), None)


def type_name(annotation: Any) -> str:
    """The plain type a value must have to fit `annotation`: int, Section, tuple, dict, ..."""
    while get_origin(annotation) is Annotated or type(None) in get_args(annotation):
        annotation = next(arg for arg in get_args(annotation) if arg is not type(None))
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return "Section"
    return getattr(get_origin(annotation) or annotation, "__name__", "str")  # Literal: "str"


# ---------------------------------------------------------------- one line per problem
TYPES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}
TYPES |= {"tuple": "a list", "frozenset": "a list", "Section": "an object", "dict": "an object"}
TYPE_ERRORS = {
    "int_type": "int",
    "float_type": "float",
    "string_type": "str",
    "bool_type": "bool",
    "tuple_type": "tuple",
    "frozen_set_type": "frozenset",
    "model_type": "Section",
    "dict_type": "dict",
}
JSON_TYPES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    kinds = {**JSON_TYPES, list: "a list", dict: "an object"}
    return next((name for kind, name in kinds.items() if isinstance(value, kind)), "a value")


def problem(root: type[Section], error: ErrorDetails) -> str | None:
    """pydantic's error as the line an operator reads: where, what is wrong, how to fix it."""
    loc, kind, value = error["loc"], error["type"], error.get("input")
    info, named, beside = _declared_at(root, loc)
    where = _path(loc)
    if kind == "too_short" and len(value) >= error["ctx"]["min_length"]:
        return None  # pydantic counts the items that passed; the others have their own lines
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), beside, n=1, cutoff=0.6)
        return f"{where}: unknown key; " + (f"did you mean {close[0]!r}?" if close else "remove it")
    if kind == "missing":
        return f"{where}: is missing; add it" + metadata(info, Key)[0].hint
    if kind == "rule":
        return f"{where}{'.' if error['ctx']['at'] else ''}{error['ctx']['at']}: {error['msg']}"
    if kind == "null":
        return f"{where}: must be {TYPES.get(type_name(info.annotation), 'a string')}, got null"
    if kind in TYPE_ERRORS or (kind == "literal_error" and not isinstance(value, str)):
        return f"{where}: must be {TYPES[TYPE_ERRORS.get(kind, 'str')]}, got {json_type(value)}"
    if kind == "literal_error":
        choices = _choices(info.annotation)
        allowed = f"{choices[0]!r}" if len(choices) == 1 else f"one of {', '.join(choices)}"
        return f"{where}: must be {allowed}, got {value!r}"
    if kind == "invalid":  # a validator's own line
        return f"{where}: {error['msg']}"
    if kind == "finite_number":
        return f"{where}: must be a finite number, got {value}"
    if invalid := metadata(info, Invalid):
        return f"{_path(loc[:named])}: " + invalid[0].text.replace("{value}", repr(value))
    if kind in ("greater_than", "greater_than_equal", "less_than_equal"):
        return f"{where}: {_out_of_bounds(info, value)}"
    return f"{where}: {error['msg']}"


def _choices(annotation: Any) -> list[str]:
    """The values a Literal allows, itself or inside an Annotated or Optional."""
    if get_origin(annotation) is Literal:
        return [str(choice) for choice in get_args(annotation)]
    return [choice for arg in get_args(annotation) for choice in _choices(arg)]


def _out_of_bounds(info: FieldInfo | None, value: Any) -> str:
    low, high, above = metadata(info, Ge), metadata(info, Le), metadata(info, Gt)
    if low and high:
        return f"must be between {low[0].ge} and {high[0].le}, got {value}"
    if above:
        return f"must be > {above[0].gt}, got {value}; use a positive number"
    return f"must be >= {low[0].ge}, got {value}; use {low[0].ge} or more"


def _declared_at(
    root: type[Section], loc: tuple[Any, ...]
) -> tuple[FieldInfo | None, int, list[str]]:
    """The field declared at `loc`, how much of `loc` names it, and the keys beside it."""
    model: type[Section] | None = root
    found: tuple[FieldInfo | None, int, list[str]] = (None, 0, list(fields_of(root)))
    for index, step in enumerate(loc):
        if isinstance(step, int) or model is None:
            continue
        if step not in (fields := fields_of(model)):
            return found[0], found[1], list(fields)
        found = (fields[step], index + 1, list(fields))
        model = section_in(fields[step].annotation)
    return found


def _path(loc: tuple[Any, ...]) -> str:
    text = ""
    for step in loc:
        if isinstance(step, int):
            text += f"[{step}]"
        elif step != "[key]":  # pydantic's mark for a problem with a key of an object
            text += f".{step}" if text else str(step)
    return text
