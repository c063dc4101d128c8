"""The config's declarations (bigpipe.config) as a JSON Schema and as the README's tables.

`bigpipe config schema` prints the JSON Schema (draft 2020-12) that
config/bigpipe.schema.json ships, for editors to check a file as it is typed.
`bigpipe config docs` prints the README's key tables; `--readme README.md`
rewrites them in place. Tests fail when either copy disagrees with the declarations.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import orjson
from annotated_types import Ge, Gt, Le
from pydantic.fields import FieldInfo
from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import PydanticUndefined, core_schema

from bigpipe.config import (
    AclEntry,
    BreakerConfig,
    Config,
    ConsumerConfig,
    DestinationConfig,
    DestinationOverride,
    SigningConfig,
    TopicConfig,
)
from bigpipe.declare import Key, Reload, Section, fields_of, metadata, type_name

SCHEMA_FILE = "config/bigpipe.schema.json"
# The README's tables, each between these marks, by the name the mark carries.
TABLES: dict[str, type[Section]] = {
    "top-level keys": Config,
    "kafka.topics[]": TopicConfig,
    "kafka.producer.acl[]": AclEntry,
    "kafka.producer.acl[].signing": SigningConfig,
    "kafka.consumer.list[]": ConsumerConfig,
    "circuitBreaker": BreakerConfig,
    "destination": DestinationConfig,
    "destination.overrides[]": DestinationOverride,
}
BEGIN, END = "<!-- bigpipe config docs: {} -->", "<!-- end of bigpipe config docs -->"
TYPE_WORDS = {"int": "int", "float": "number", "bool": "bool", "str": "string", "dict": "object"}
TYPE_WORDS |= {"tuple": "list", "frozenset": "list", "Section": "object"}
ON_RELOAD = {Reload.APPLIES: "applies", Reload.RESTART: "restart", Reload.REFUSED: "refused"}


class _Generator(GenerateJsonSchema):
    """pydantic's JSON Schema, as the loader reads a file."""

    def generate(self, schema: core_schema.CoreSchema, mode: Any = "validation") -> Any:
        return {"$schema": self.schema_dialect, **super().generate(schema, mode)}

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False  # "Kafka.Topics" says nothing the key does not

    def nullable_schema(self, schema: core_schema.NullableSchema) -> Any:
        return self.generate_inner(schema["schema"])  # an absent key is None; null is refused

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> Any:
        if schema.get("default") is None:  # absent means "none": there is no value to show
            return self.generate_inner(schema["schema"])
        return super().default_schema(schema)

    def set_schema(self, schema: Any) -> Any:  # frozensets: the loader keeps one of repeats
        return {k: v for k, v in super().set_schema(schema).items() if k != "uniqueItems"}

    frozenset_schema = set_schema


def json_schema() -> dict[str, Any]:
    schema = Config.model_json_schema(by_alias=True, schema_generator=_Generator)
    schema["title"] = "Bigpipe config"
    schema["description"] = "The config file of Bigpipe (bigpipe -config FILE); see its README."
    return schema


def json_schema_text() -> str:
    """The schema as config/bigpipe.schema.json holds it."""
    return orjson.dumps(json_schema(), option=orjson.OPT_INDENT_2).decode() + "\n"


# ---------------------------------------------------------------- the README's tables
def tables() -> str:
    """Every table, between its marks, as the README holds them."""
    return "\n\n".join(_marked(name) for name in TABLES) + "\n"


def _marked(name: str) -> str:
    return f"{BEGIN.format(name)}\n{_table(TABLES[name])}{END}"


def _table(model: type[Section]) -> str:
    on_reload = model is Config  # entries reload with their list
    head = ["key", "type", "default", *(["on reload"] * on_reload), "meaning"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for alias, info in fields_of(model).items():
        key = metadata(info, Key)[0]
        cells = [f"`{alias}`", _type(info, key), _default(info, key)]
        cells += [ON_RELOAD[key.reload]] * on_reload + [info.description or ""]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows) + "\n"


def _type(info: FieldInfo, key: Key) -> str:
    if get_origin(info.annotation) is Literal:
        return " or ".join(f'`"{choice}"`' for choice in get_args(info.annotation))
    words = [key.kind or TYPE_WORDS[type_name(info.annotation)], key.unit]
    low, high, above = metadata(info, Ge), metadata(info, Le), metadata(info, Gt)
    if low and high:
        words.append(f"{low[0].ge}–{high[0].le}")
    elif above or low:
        words.append(f"> {above[0].gt}" if above else f"≥ {low[0].ge}")
    return " ".join(filter(None, words))


def _default(info: FieldInfo, key: Key) -> str:
    if info.default is PydanticUndefined:
        return "required"
    if key.default_doc:
        return key.default_doc
    value = sorted(info.default) if isinstance(info.default, frozenset) else info.default
    return f"`{orjson.dumps(value).decode().replace(',', ', ')}`"


def with_tables(readme: str) -> str:
    """The README with each marked table as the declarations say."""
    for name in TABLES:
        mark = re.escape(BEGIN.format(name))
        readme = re.sub(
            f"{mark}\n.*?{re.escape(END)}", lambda _, n=name: _marked(n), readme, flags=re.S
        )
    return readme


# ---------------------------------------------------------------- bigpipe config …
def add_parser(commands: Any) -> None:
    parser = commands.add_parser("config", help="the config's JSON Schema, README tables, a check")
    actions = parser.add_subparsers(dest="action", required=True)
    schema = actions.add_parser("schema", help="print the config's JSON Schema (draft 2020-12)")
    schema.set_defaults(run=lambda _: print(json_schema_text(), end="") or 0)
    docs = actions.add_parser("docs", help="print the README's tables of config keys")
    docs.add_argument("--readme", type=Path, help="rewrite the tables of this README instead")
    docs.set_defaults(run=_docs)
    check = actions.add_parser("check", help="the same as: bigpipe -config FILE --check")
    check.add_argument("file")
    check.set_defaults(run=_check)


def _docs(args: argparse.Namespace) -> int:
    if args.readme is None:
        print(tables(), end="")
    else:
        args.readme.write_text(with_tables(args.readme.read_text()))
    return 0


def _check(args: argparse.Namespace) -> int:
    from bigpipe.cli import main  # the node's own check, word for word

    return main(["-config", args.file, "--check"])
