"""JSON Schemas shipped in the wheel (`schemas/*.json`), loaded with importlib.resources, and the one cache of
their validators. Violations come out two ways: terse (`schema_errors`, `check`) and described for a person,
each tied to the top-level field it is about (`schema_findings`, for validation's findings)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from jsonschema import Draft202012Validator, ValidationError

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


def checked_report(name: str, report: dict) -> dict:
    """`report` itself, once it matches schema `name` (a report that does not is our bug, never the input's)."""
    errors = schema_errors(name, report)
    if errors:
        raise LongcatError(f"internal: the report does not match the {name} schema: {errors[0]}",
                           fix="please report this as a bug")
    return report


def _where(error: ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(document)"


# ---- readable descriptions ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SchemaProblem:
    field: str | None  # the top-level field concerned, None for the document as a whole
    text: str


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
