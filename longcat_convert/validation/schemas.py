"""Schema checks with readable messages, each tied to the top-level field it is about."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from jsonschema import Draft202012Validator, ValidationError

from ..jsonschemas import load_schema


@dataclass(frozen=True)
class SchemaProblem:
    field: str | None  # the top-level field concerned, None for the document as a whole
    text: str


@cache
def _validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(load_schema(name))


def schema_findings(name: str, document) -> list[SchemaProblem]:
    """Every violation of schema `name`, described for a person."""
    errors = sorted(_validator(name).iter_errors(document), key=lambda e: [str(p) for p in e.absolute_path])
    problems: list[SchemaProblem] = []
    for error in errors:
        problems.extend(_describe(error))
    return problems


def _describe(error: ValidationError) -> list[SchemaProblem]:
    path = [str(p) for p in error.absolute_path]
    where = ".".join(path)
    if error.validator == "required":
        present = error.instance if isinstance(error.instance, dict) else {}
        missing = [name for name in error.validator_value if name not in present]
        prefix = f"{where}." if where else ""
        return [SchemaProblem(path[0] if path else name, f"required field {prefix}{name} is missing")
                for name in missing]
    field = path[0] if path else None
    description = error.schema.get("description") if isinstance(error.schema, dict) else None
    if description and error.validator in ("pattern", "not", "minLength", "maxLength"):
        return [SchemaProblem(field, f"{where} is {_short(error.instance)}, expected {description}")]
    if error.validator == "const":
        return [SchemaProblem(field, f"{where} is {_short(error.instance)}, expected {error.validator_value!r}")]
    if error.validator == "type":
        wanted = error.validator_value if isinstance(error.validator_value, str) else " or ".join(error.validator_value)
        return [SchemaProblem(field, f"{where or 'the document'} must be {_article(wanted)}, got {_short(error.instance)}")]
    if error.validator == "enum":
        return [SchemaProblem(field, f"{where} is {_short(error.instance)}, expected one of {error.validator_value!r}")]
    if error.validator == "contains" and field is not None:
        return [SchemaProblem(field, f"{where} {_short(error.instance)} does not contain the required "
                                     f"{error.validator_value.get('const', error.validator_value)!r}")]
    subject = where or "the document"
    return [SchemaProblem(field, f"{subject}: {_short(error.message, 200)}")]


def _article(type_name: str) -> str:
    return ("an " if type_name[0] in "aeiou" else "a ") + type_name


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
