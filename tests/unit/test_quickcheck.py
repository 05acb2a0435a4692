"""The quick schema check never says "valid" where jsonschema (Draft 2020-12) says "invalid", and it passes
the options every built-in plugin starts with, so no agent imports jsonschema to start."""

from __future__ import annotations

import jsonschema
from hypothesis import given, settings
from hypothesis import strategies as st

from cortex.config import PluginSettings
from cortex.plugins import host
from cortex.plugins.quickcheck import plainly_valid

PLUGIN_SCHEMAS = {name: host._load_class(name).options_schema for name in sorted(host.discover())}


def _agrees(schema, value) -> None:
    if plainly_valid(schema, value):
        assert list(jsonschema.Draft202012Validator(schema).iter_errors(value)) == [], (schema, value)


def test_every_built_in_plugin_starts_without_asking_jsonschema():
    for name, schema in PLUGIN_SCHEMAS.items():
        options = host.validate_options(name, schema, PluginSettings(), "test")
        assert plainly_valid(schema, options), name


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(-5, 5, allow_nan=False) | st.text(max_size=4)
    | st.sampled_from(["a", "1.2.3.4", "x-y", "", "ABC"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=8,
)
types = st.sampled_from(["object", "array", "string", "integer", "number", "boolean", "null"])
leaf_schema = st.fixed_dictionaries({}, optional={
    "type": types | st.lists(types, min_size=1, max_size=2),
    "minimum": st.integers(-3, 3) | st.floats(-3, 3), "maximum": st.integers(-3, 3),
    "exclusiveMinimum": st.integers(-3, 3), "exclusiveMaximum": st.floats(-3, 3),
    "enum": st.lists(json_values, max_size=3), "const": json_values,
    "minLength": st.integers(0, 3), "maxLength": st.integers(0, 3), "pattern": st.sampled_from(["^a", "[0-9]", "y$"]),
    "minItems": st.integers(0, 2), "maxItems": st.integers(0, 2), "default": json_values, "description": st.text(),
})
schemas = st.recursive(
    leaf_schema | st.booleans(),
    lambda inner: st.fixed_dictionaries({}, optional={
        "type": types, "properties": st.dictionaries(st.text(max_size=3), inner, max_size=3),
        "additionalProperties": inner, "required": st.lists(st.text(max_size=3), max_size=2), "items": inner,
        "uniqueItems": st.booleans(),  # not in the quick check's part: it must answer "ask"
    }),
    max_leaves=6,
)


@settings(max_examples=600, deadline=None)
@given(schemas, json_values)
def test_valid_only_where_jsonschema_finds_nothing(schema, value):
    _agrees(schema, value)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(sorted(PLUGIN_SCHEMAS)), st.dictionaries(st.text(max_size=12), json_values, max_size=3))
def test_plugin_schemas_with_odd_options(name, options):
    schema = PLUGIN_SCHEMAS[name]
    keys = sorted(schema.get("properties", {}))
    _agrees(schema, options)
    if keys:  # the real option names with arbitrary values
        _agrees(schema, {keys[len(k) % len(keys)]: v for k, v in options.items()})


def test_json_equality_inside_arrays():
    _agrees({"enum": [[True]]}, [1])
    _agrees({"const": {"a": [False]}}, {"a": [0]})
    assert plainly_valid({"enum": [[1.0]]}, [1])
