"""Structured output: OpenAI's ``response_format`` to a GBNF grammar for llama.cpp's grammar sampler.

The conversion of a JSON schema is llama-cpp-python's own (``json_schema_to_gbnf``), and plain JSON is
its ``JSON_GBNF``. A schema the converter cannot handle is a one-line error, never a silent fallback to
unconstrained JSON.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from .errors import BadInputError

FORMATS = ("text", "json_object", "json_schema")


def _invalid(message: str, **fields) -> BadInputError:
    return BadInputError(message, param="response_format", **fields)


def schema_grammar(schema: object) -> str:
    """GBNF for JSON that validates against ``schema`` (a JSON schema as a dict)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    if not isinstance(schema, Mapping):
        raise _invalid("the JSON schema must be an object, got {kind}", kind=type(schema).__name__)
    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter is llama-cpp-python's: whatever it raises means it cannot do this one
        raise _invalid(
            "the JSON schema cannot be turned into a grammar ({kind}: {detail}); simplify it",
            kind=type(exc).__name__,
            detail=str(exc) or "no detail",
        ) from None


def json_grammar() -> str:
    """GBNF for any JSON value."""
    from llama_cpp.llama_grammar import JSON_GBNF

    return JSON_GBNF


def response_format_grammar(response_format: Mapping | None) -> str | None:
    """The grammar for an OpenAI ``response_format``: None for text, any JSON for ``json_object`` (or its
    ``schema``, as llama-cpp-python allows), the schema's JSON for ``json_schema``."""
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise _invalid("response_format must be an object such as {example}", example='{"type": "json_object"}')
    kind = response_format.get("type")
    if kind not in FORMATS:
        raise _invalid(
            "unknown response_format type {kind!r}; choose one of: {choices}", kind=kind, choices=", ".join(FORMATS)
        )
    if kind == "text":
        return None
    if kind == "json_object":
        schema = response_format.get("schema")
        return json_grammar() if schema is None else schema_grammar(schema)
    spec = response_format.get("json_schema")
    if not isinstance(spec, Mapping) or "schema" not in spec:
        raise _invalid("a json_schema response_format needs json_schema.schema, the JSON schema itself")
    return schema_grammar(spec["schema"])
