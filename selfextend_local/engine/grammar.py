"""Structured output: OpenAI's ``response_format``, a JSON schema or GBNF text, to a grammar for llama.cpp's
grammar sampler, and the check of the finished reply.

The conversion of a JSON schema is llama-cpp-python's own (``json_schema_to_gbnf``), and plain JSON is its
``JSON_GBNF``. Everything is bounded *before* it reaches the converter or llama.cpp's parser: both expand a
length or item count into one nested rule per unit (a ``maxLength`` of 20,000 overflowed the parser's
stack and killed the process; a ``minLength`` of 10^8 took 3.5 GB), and the grammar sampler's cost per
token grows with an ``enum``'s size. A schema the converter cannot handle is a one-line error, never a
silent fallback to unconstrained JSON.

The grammar holds each token to the schema's shape, but not to everything a schema says (``allOf``,
formats, a pattern's reach), and a reply cut by ``max_tokens`` is unfinished: the final text of a reply
that stopped is therefore parsed and validated (:func:`check_reply`), and one that does not validate is an
error, never a silent success.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from .errors import BadInputError, SelfExtendError

FORMATS = ("text", "json_object", "json_schema")

# Bounds a schema must keep (each measured against what llama.cpp's parser and sampler stand).
MAX_REPEAT = 1000  # lengths and counts: one nested rule each; llama.cpp's parser gives up at ~1,100
MAX_ENUM = 256  # values of one enum: the sampler tries every one at every token
MAX_ENUM_BYTES = 16 << 10  # their JSON, all together
MAX_PATTERN = 1000  # characters of a regular expression
MAX_NODES = 2000  # objects in the whole schema
MAX_DEPTH = 32  # nesting of the schema
MAX_GRAMMAR_BYTES = 256 << 10  # GBNF text
MAX_GRAMMAR_NESTING = 1000  # parentheses in GBNF: llama.cpp's parser recurses once per level
_COUNTS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties", "minContains")
_PAIRS = (("minLength", "maxLength"), ("minItems", "maxItems"), ("minProperties", "maxProperties"))
# llama-cpp-python's string character admits raw control characters, which JSON forbids (a reply with a
# newline inside a string is not JSON); llama.cpp's own converter excludes them as here.
_LOOSE_CHAR = 'char ::= [^"\\\\] |'
_JSON_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'


class ReplyError(SelfExtendError):
    """A finished reply is not what its response format promised (not JSON, or not valid against the
    schema); ``text`` is what the model wrote."""

    def __init__(self, message: str, *, text: str = "", **fields) -> None:
        super().__init__(message, param="response_format", **fields)
        self.text = text


class GrammarDeadEnd(SelfExtendError):
    """The grammar allows no token at all here: no text can satisfy it from this point."""


@dataclass(frozen=True)
class Structure:
    """What a reply must be: ``grammar`` (GBNF) for the sampler; ``schema`` for the finished text (True:
    any JSON value; a dict: JSON valid against it; None: nothing beyond the grammar)."""

    grammar: str
    schema: Mapping | bool | None = None

    def fields(self) -> dict:
        """As :class:`~.settings.SamplingSettings` fields."""
        return {"grammar": self.grammar, "schema": self.schema}


def _invalid(message: str, **fields) -> BadInputError:
    return BadInputError(message, param="response_format", **fields)


# -- bounds ---------------------------------------------------------------------------------------


def _nodes(schema: object, depth: int = 0) -> Iterator[tuple[Mapping, int]]:
    """Every object in the schema with its depth, refusing one too deep."""
    if depth > MAX_DEPTH:
        raise _invalid("the JSON schema is nested more than {most} levels deep; flatten it", most=MAX_DEPTH)
    if isinstance(schema, Mapping):
        yield schema, depth
        children = schema.values()
    elif isinstance(schema, list):
        children = schema
    else:
        return
    for child in children:
        yield from _nodes(child, depth + 1)


def _count(node: Mapping, key: str) -> int | None:
    value = node.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != int(value):
        raise _invalid("{key} must be a whole number of at least 0, got {value!r}", key=key, value=value)
    if value > MAX_REPEAT:
        raise _invalid(
            "{key} {value} is over {most}, the most a schema may ask for here; lower it",
            key=key,
            value=int(value),
            most=MAX_REPEAT,
        )
    return int(value)


def _check_node(node: Mapping) -> None:
    counts = {key: _count(node, key) for key in _COUNTS}
    for low, high in _PAIRS:
        if counts[low] is not None and counts[high] is not None and counts[low] > counts[high]:
            raise _invalid(
                "no value satisfies the JSON schema: {low} {a} is above {high} {b}",
                low=low,
                high=high,
                a=counts[low],
                b=counts[high],
            )
    low, high = node.get("minimum"), node.get("maximum")
    if isinstance(low, (int, float)) and isinstance(high, (int, float)) and low > high:
        raise _invalid("no value satisfies the JSON schema: minimum {a} is above maximum {b}", a=low, b=high)
    enum = node.get("enum")
    if isinstance(enum, list):
        if len(enum) > MAX_ENUM:
            raise _invalid("an enum has {n} values; at most {most} are allowed", n=len(enum), most=MAX_ENUM)
        if len(json.dumps(enum)) > MAX_ENUM_BYTES:
            raise _invalid("an enum's values are over {most} bytes in all; shorten them", most=MAX_ENUM_BYTES)
    pattern = node.get("pattern")
    if isinstance(pattern, str):
        _check_pattern(pattern)
    ref = node.get("$ref")
    if isinstance(ref, str) and not ref.startswith("#"):
        raise _invalid("the JSON schema refers to {ref!r}: only references within it (#/...) are allowed", ref=ref)


def _check_pattern(pattern: str) -> None:
    if len(pattern) > MAX_PATTERN:
        raise _invalid("a pattern has {n} characters; at most {most}", n=len(pattern), most=MAX_PATTERN)
    for found in re.finditer(r"\{(\d+)(?:,(\d*))?\}", pattern):
        counts = [int(n) for n in found.groups() if n]
        if max(counts) > MAX_REPEAT:
            raise _invalid("a pattern repeats {what} times; at most {most}", what=found.group(0), most=MAX_REPEAT)


def check_schema(schema: object) -> None:
    """Raise BadInputError (about ``response_format``) unless ``schema`` is a JSON schema within the bounds."""
    from jsonschema import SchemaError, validators

    if not isinstance(schema, Mapping):
        raise _invalid("the JSON schema must be an object, got {kind}", kind=type(schema).__name__)
    for n, (node, _) in enumerate(_nodes(schema)):
        if n >= MAX_NODES:
            raise _invalid("the JSON schema has over {most} parts; simplify it", most=MAX_NODES)
        _check_node(node)
    try:
        validators.validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        raise _invalid("the JSON schema is not valid: {detail}", detail=exc.message) from None


def gbnf_nesting(text: str) -> int:
    """The deepest nesting of parentheses in GBNF ``text`` (outside literals, classes and comments)."""
    depth = deepest = 0
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in '"[':
            close = '"' if c == '"' else "]"
            i += 1
            while i < n and text[i] != close:
                i += 2 if text[i] == "\\" else 1
        elif c == "#":
            while i < n and text[i] != "\n":
                i += 1
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth -= 1
        i += 1
    return deepest


def check_gbnf(text: str) -> None:
    """Raise BadInputError (about ``grammar``) for GBNF too large or too deep for llama.cpp's parser."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise BadInputError("the grammar is not valid Unicode (a lone surrogate)", param="grammar") from None
    if size > MAX_GRAMMAR_BYTES:
        raise BadInputError("the grammar is over {most} bytes", param="grammar", most=MAX_GRAMMAR_BYTES)
    if (deepest := gbnf_nesting(text)) > MAX_GRAMMAR_NESTING:
        raise BadInputError(
            "the grammar nests {n} levels of parentheses; at most {most}",
            param="grammar",
            n=deepest,
            most=MAX_GRAMMAR_NESTING,
        )


# -- conversion -----------------------------------------------------------------------------------


def schema_structure(schema: object) -> Structure:
    """The grammar for JSON that validates against ``schema``, and the schema to check the reply with."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    check_schema(schema)
    try:
        grammar = json_schema_to_gbnf(json.dumps(schema))
    except RecursionError:
        raise _invalid("the JSON schema refers to itself too deeply to be turned into a grammar") from None
    except Exception as exc:  # the converter is llama-cpp-python's: whatever it raises means it cannot do this one
        raise _invalid(
            "the JSON schema cannot be turned into a grammar ({kind}: {detail}); simplify it",
            kind=type(exc).__name__,
            detail=str(exc) or "no detail",
        ) from None
    grammar = grammar.replace(_LOOSE_CHAR, _JSON_CHAR)
    try:
        check_gbnf(grammar)
    except BadInputError as exc:
        raise _invalid("the JSON schema makes too large a grammar ({detail}); simplify it", detail=exc) from None
    return Structure(grammar, schema)


def json_structure() -> Structure:
    """Any JSON value."""
    from llama_cpp.llama_grammar import JSON_GBNF

    return Structure(JSON_GBNF, True)


def response_format_structure(response_format: Mapping | None) -> Structure | None:
    """The structure an OpenAI ``response_format`` asks for: None for text, any JSON for ``json_object``
    (or its ``schema``, as llama-cpp-python allows), the schema's JSON for ``json_schema``."""
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
        return json_structure() if schema is None else schema_structure(schema)
    spec = response_format.get("json_schema")
    if not isinstance(spec, Mapping) or "schema" not in spec:
        raise _invalid("a json_schema response_format needs json_schema.schema, the JSON schema itself")
    return schema_structure(spec["schema"])


# -- the finished reply ---------------------------------------------------------------------------


def check_reply(text: str, schema: Mapping | bool) -> None:
    """Raise ReplyError unless ``text`` is one JSON value (that validates against ``schema``, a dict)."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ReplyError("the reply is not valid JSON ({detail})", text=text, detail=exc) from None
    if not isinstance(schema, Mapping):
        return
    from jsonschema import validators

    error = next(iter(validators.validator_for(schema)(schema).iter_errors(value)), None)
    if error is not None:
        where = "".join(f"[{p!r}]" for p in error.absolute_path) or "the top level"
        raise ReplyError(
            "the reply does not validate against the JSON schema ({detail}, at {where}); the schema may allow "
            "no value at all",
            text=text,
            detail=error.message,
            where=where,
        )
