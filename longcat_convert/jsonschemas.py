"""JSON Schemas shipped in the wheel (`schemas/*.json`), loaded with importlib.resources."""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path

import jsonschema
from jsonschema import Draft202012Validator

from .errors import LongcatError
from .io.jsonfile import parse_json


@cache
def load_schema(name: str) -> dict:
    text = resources.files("longcat_convert.schemas").joinpath(f"{name}.schema.json").read_text(encoding="utf-8")
    return parse_json(text, f"schemas/{name}.schema.json")


@cache
def _validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(load_schema(name))


def schema_errors(name: str, document) -> list[str]:
    """Every violation of schema `name`, each as 'path.to.field: message'."""
    errors = sorted(_validator(name).iter_errors(document), key=lambda e: list(e.absolute_path))
    return [f"{_where(e)}: {e.message}" for e in errors]


def check(name: str, document, path: str | Path) -> None:
    """Raise a LongcatError naming the first violation of schema `name`."""
    errors = schema_errors(name, document)
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise LongcatError(f"does not match the {name} schema: {errors[0]}{more}", path)


def _where(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(document)"
