"""JSON Schemas and the loaders/validators built on them (facts, commit manifests, store config)."""

import json
from functools import cache
from importlib import resources

from jsonschema import Draft202012Validator


@cache
def validator(name: str) -> Draft202012Validator:
    """The validator for one of the bundled schemas, e.g. `validator("fact")`."""
    text = resources.files(__package__).joinpath(f"{name}.schema.json").read_text(encoding="utf-8")
    schema = json.loads(text)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def first_error(name: str, instance: object) -> str | None:
    """A one-line description of the first schema violation ('field: message'), or None if valid."""
    errors = sorted(validator(name).iter_errors(instance), key=lambda e: list(e.absolute_path))
    if not errors:
        return None
    error = errors[0]
    field = ".".join(str(p) for p in error.absolute_path) or "(record)"
    return f"{field}: {_describe(error)}"


def _describe(error) -> str:
    """The validator's message, without echoing a huge offending value back."""
    if error.validator == "maxLength":
        return f"is longer than {error.validator_value} characters"
    if error.validator == "maxItems":
        return f"has more than {error.validator_value} items"
    return error.message if len(error.message) <= 160 else f"{error.message[:150]}… ({error.validator})"
