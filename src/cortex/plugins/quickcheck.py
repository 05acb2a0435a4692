"""A yes-or-ask check of a value against the small part of JSON Schema that plugin option schemas use.

Every agent validates each plugin's options at start. jsonschema (with referencing, rpds and attrs) costs
every node several megabytes of resident memory to say "valid" to options that almost always are. This check
answers True only when the schema uses nothing but the keywords below and the value satisfies them, by the
rules of Draft 2020-12; anything else -- an unknown keyword, a violation -- answers False and the caller asks
jsonschema, which then also words the error. So the verdict and every message stay jsonschema's; only the
common "valid" needs no import.
"""

from __future__ import annotations

import re
from typing import Any

# keywords that only annotate (Draft 2020-12 does not assert "format" by default)
_ANNOTATIONS = frozenset({"default", "description", "title", "examples", "$comment", "format", "deprecated",
                          "readOnly", "writeOnly"})
_ASSERTIONS = frozenset({"type", "properties", "additionalProperties", "required", "enum", "const", "minimum",
                         "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "pattern",
                         "items", "minItems", "maxItems"})


def _is_type(value: Any, name: str) -> bool | None:
    if name == "object":
        return isinstance(value, dict)
    if name == "array":
        return isinstance(value, list)
    if name == "string":
        return isinstance(value, str)
    if name == "boolean":
        return isinstance(value, bool)
    if name == "null":
        return value is None
    if isinstance(value, bool):
        return False if name in ("integer", "number") else None
    if name == "number":
        return isinstance(value, int | float)
    if name == "integer":
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    return None  # not a JSON Schema type: let jsonschema say so


def _equal(a: Any, b: Any) -> bool:
    # JSON equality: True is not 1 (Python's == says it is), also inside arrays and objects
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, list) or isinstance(b, list):
        return isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and all(map(_equal, a, b))
    if isinstance(a, dict) or isinstance(b, dict):
        return (isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys()
                and all(_equal(a[k], b[k]) for k in a))
    return a == b


def plainly_valid(schema: Any, value: Any) -> bool:
    """True: `value` is valid against `schema`. False: not known -- ask jsonschema."""
    try:
        return _valid(schema, value)
    except (TypeError, ValueError, re.error, RecursionError):  # a malformed schema: jsonschema says what is wrong
        return False


def _valid(schema: Any, value: Any) -> bool:
    if schema is True:
        return True
    if not isinstance(schema, dict) or not set(schema) <= _ASSERTIONS | _ANNOTATIONS:
        return False
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(value, t) for t in types):
            return False
    if "enum" in schema and not (isinstance(schema["enum"], list)
                                 and any(_equal(value, option) for option in schema["enum"])):
        return False
    if "const" in schema and not _equal(value, schema["const"]):
        return False
    if isinstance(value, int | float) and not isinstance(value, bool):
        for key, ok in (("minimum", lambda v, x: v >= x), ("maximum", lambda v, x: v <= x),
                        ("exclusiveMinimum", lambda v, x: v > x), ("exclusiveMaximum", lambda v, x: v < x)):
            if key in schema:
                bound = schema[key]
                if isinstance(bound, bool) or not isinstance(bound, int | float) or not ok(value, bound):
                    return False
    if isinstance(value, str):
        if "minLength" in schema and not len(value) >= schema["minLength"]:
            return False
        if "maxLength" in schema and not len(value) <= schema["maxLength"]:
            return False
        if "pattern" in schema and not (isinstance(schema["pattern"], str) and re.search(schema["pattern"], value)):
            return False
    if isinstance(value, list):
        if "minItems" in schema and not len(value) >= schema["minItems"]:
            return False
        if "maxItems" in schema and not len(value) <= schema["maxItems"]:
            return False
        if "items" in schema and not all(_valid(schema["items"], item) for item in value):
            return False
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        if not isinstance(properties, dict) or not isinstance(schema.get("required", []), list):
            return False
        if any(key not in value for key in schema.get("required", [])):
            return False
        for key, item in value.items():
            sub = properties.get(key, extra)
            if sub is False or not _valid(sub, item):
                return False
    return True
