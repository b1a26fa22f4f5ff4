"""The TradingPolicy and EmergencyStop CRDs: structural, in step with policy.py, and strict enough.

What runs here, and what only the API server can run:

* OpenAPI validation is emulated with ``jsonschema``: each CRD's ``openAPIV3Schema`` is translated
  to JSON Schema 2020-12 (``to_json_schema``). Objects get ``additionalProperties: false``, which
  emulates kubectl's strict field validation (kubectl >= 1.27 sends ``fieldValidation=Strict``,
  so the API server rejects an unknown field instead of silently pruning it; a client that does
  not ask for strict validation gets pruning, not rejection).
* Defaults are applied as the API server applies them (absent field -> its default, then the
  defaults inside that), before validation.
* CEL (``x-kubernetes-validations``) is evaluated by the API server, not here. Every rule has a
  Python predicate below, keyed by the rule's message; the tests check that the CRDs hold exactly
  those rules and that the predicates reject the counter-examples. When cel-python is installed,
  the CEL text itself is also evaluated on the same documents and must agree with the predicates
  (cel-python is a CEL implementation, not the API server's cel-go with its cost limits).
"""

from __future__ import annotations

import copy
import functools
import re
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import jsonschema
import pytest
import yaml
from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from qtrader.contracts.policy import (
    API_GROUP,
    API_VERSION,
    PolicyError,
    TradingMode,
    TradingPolicySpec,
    load_policy_file,
    parse_policy,
)

ROOT = Path(__file__).resolve().parents[3]
CRD_DIR = ROOT / "crds"
EXAMPLES_DIR = ROOT / "examples"

JsonObject = dict[str, Any]
Path_ = tuple[str, ...]

CRD_FILES: Final = {
    "TradingPolicy": CRD_DIR / "tradingpolicies.qtrader.dev.yaml",
    "EmergencyStop": CRD_DIR / "emergencystops.qtrader.dev.yaml",
}
KINDS: Final = tuple(CRD_FILES)


class _Missing:
    """No value at this path (distinct from a value that is null, false or zero)."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final = _Missing()


# --- loading ----------------------------------------------------------------------------------


def load_documents(path: Path) -> list[JsonObject]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@functools.cache
def crd(kind: str) -> JsonObject:
    (document,) = load_documents(CRD_FILES[kind])
    assert isinstance(document, dict)
    return document


def crd_version(kind: str) -> JsonObject:
    (version,) = crd(kind)["spec"]["versions"]
    assert isinstance(version, dict)
    return version


def crd_schema(kind: str) -> JsonObject:
    schema = crd_version(kind)["schema"]["openAPIV3Schema"]
    assert isinstance(schema, dict)
    return schema


def schema_at(kind: str, path: Path_) -> JsonObject:
    node = crd_schema(kind)
    for name in path:
        node = node["items"] if name == "[]" else node["properties"][name]
    return node


def example_documents() -> list[tuple[Path, JsonObject]]:
    return [
        (path, doc)
        for path in sorted(EXAMPLES_DIR.glob("*.yaml"))
        for doc in load_documents(path)
        if isinstance(doc, dict) and str(doc.get("apiVersion", "")).startswith(f"{API_GROUP}/")
    ]


def example(name: str) -> JsonObject:
    (document,) = load_documents(EXAMPLES_DIR / name)
    return copy.deepcopy(document)


# --- OpenAPI (Kubernetes dialect) -> JSON Schema 2020-12 --------------------------------------

_SAME_IN_BOTH = frozenset(
    {
        "type",
        "required",
        "enum",
        "minimum",
        "maximum",
        "minLength",
        "maxLength",
        "pattern",
        "minItems",
        "maxItems",
        "minProperties",
        "maxProperties",
        "multipleOf",
        "format",
    }
)
# Keywords that do not constrain a value by themselves: documentation, defaulting (applied by
# apply_defaults), CEL (checked through CEL_RULES), list-map keys (checked by admit).
_NOT_JSON_SCHEMA_VALIDATION = frozenset(
    {
        "description",
        "default",
        "example",
        "x-kubernetes-validations",
        "x-kubernetes-list-map-keys",
        "x-kubernetes-map-type",
        "x-kubernetes-embedded-resource",
        "x-kubernetes-preserve-unknown-fields",
        "nullable",
    }
)
# OpenAPI 3.0 exclusiveMinimum/Maximum are booleans modifying minimum/maximum; 2020-12 has numbers.
_EXCLUSIVE_BOUND = {"exclusiveMinimum": "minimum", "exclusiveMaximum": "maximum"}


def to_json_schema(node: JsonObject) -> JsonObject:
    """Translate one OpenAPI schema node; an unknown keyword fails loudly instead of vanishing."""
    out: JsonObject = {}
    for key, value in node.items():
        if key in _SAME_IN_BOTH:
            out[key] = value
        elif key in _NOT_JSON_SCHEMA_VALIDATION:
            continue
        elif key == "properties":
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key == "items":
            out[key] = to_json_schema(value)
        elif key == "additionalProperties":
            out[key] = to_json_schema(value) if isinstance(value, dict) else value
        elif key in _EXCLUSIVE_BOUND:
            if value:
                out[key] = node[_EXCLUSIVE_BOUND[key]]
        elif key == "x-kubernetes-list-type":
            # "set" items must be unique (the API server says "Duplicate value"); Kubernetes
            # forbids uniqueItems itself, so it only appears in the translation.
            if value == "set":
                out["uniqueItems"] = True
        elif key == "x-kubernetes-int-or-string":
            out["type"] = ["integer", "string"]
        else:
            raise ValueError(f"no JSON Schema translation for OpenAPI keyword {key!r}")
    if node.get("nullable"):
        out["type"] = [out["type"], "null"]
    if (
        node.get("type") == "object"
        and "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False  # kubectl's strict field validation, see the docstring
    return out


_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")
FORMATS = jsonschema.FormatChecker(formats=())


def _is_date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True
    if not _RFC3339.match(value):
        return False
    try:
        datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


FORMATS.checks("date-time")(_is_date_time)


@functools.cache
def validator(kind: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(to_json_schema(crd_schema(kind)), format_checker=FORMATS)


def apply_defaults(schema: JsonObject, value: Any) -> Any:
    """Structural defaulting: an absent property takes its default, then defaults inside it."""
    if isinstance(value, dict):
        properties: JsonObject = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        out = dict(value)
        for name, sub in properties.items():
            if name not in out and "default" in sub:
                out[name] = copy.deepcopy(sub["default"])
        for name, child in out.items():
            if name in properties:
                out[name] = apply_defaults(properties[name], child)
            elif isinstance(extra, dict):
                out[name] = apply_defaults(extra, child)
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(schema["items"], item) for item in value]
    return value


def walk(
    schema: JsonObject, value: Any, old: Any, path: Path_ = ()
) -> Iterator[tuple[JsonObject, Any, Any, Path_]]:
    """Every (schema node, value, old value or MISSING, path) present in ``value``.

    Old values are correlated as the API server correlates them for transition rules: by
    property name, by map key, and by list-map key; never by position.
    """
    yield schema, value, old, path
    if isinstance(value, dict):
        properties: JsonObject = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for name, child in value.items():
            sub = properties.get(name) or (extra if isinstance(extra, dict) else None)
            if sub is None:
                continue  # an unknown field; jsonschema reports it
            old_child = old.get(name, MISSING) if isinstance(old, dict) else MISSING
            yield from walk(sub, child, old_child, (*path, name))
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        keys: list[str] = schema.get("x-kubernetes-list-map-keys", [])
        old_items: dict[tuple[Any, ...], Any] = {}
        if keys and isinstance(old, list):
            old_items = {_list_map_key(item, keys): item for item in old}
        for index, item in enumerate(value):
            old_item = old_items.get(_list_map_key(item, keys), MISSING) if keys else MISSING
            yield from walk(schema["items"], item, old_item, (*path, str(index)))


def _list_map_key(item: Any, keys: list[str]) -> tuple[Any, ...]:
    return tuple(item.get(key) for key in keys) if isinstance(item, dict) else (item,)


# --- CEL rules and their Python equivalents ---------------------------------------------------


def _double(value: Any) -> float:
    """CEL ``double()`` on a decimal string; an unparsable string is an evaluation error."""
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise TypeError(f"double() of {value!r}")
    return float(value)


@dataclass(frozen=True)
class CelRule:
    kind: str
    path: Path_
    rule: str
    holds: Callable[[Any, Any], bool]  # (self, oldSelf) -> the rule holds

    @property
    def is_transition_rule(self) -> bool:
        return "oldSelf" in self.rule


PAPER_BUYING_POWER: Final = (
    "risk.maxPositionUsd must not exceed paper.initialCapitalUsd x risk.maxLeverage in paper mode"
)
# Keyed by message. The rule text must match the CRD's (whitespace-normalised), so editing a rule
# without editing its equivalent here fails test_the_crds_hold_exactly_the_cel_rules_listed_here.
CEL_RULES: Final[dict[str, CelRule]] = {
    PAPER_BUYING_POWER: (
        CelRule(
            "TradingPolicy",
            ("spec",),
            "self.mode != 'paper' || double(self.risk.maxPositionUsd) <= "
            "double(self.paper.initialCapitalUsd) * double(self.risk.maxLeverage)",
            lambda s, _: (
                s["mode"] != "paper"
                or _double(s["risk"]["maxPositionUsd"])
                <= _double(s["paper"]["initialCapitalUsd"]) * _double(s["risk"]["maxLeverage"])
            ),
        )
    ),
    "risk.maxPositionUsd must be greater than 0 and at most 1000000000000": CelRule(
        "TradingPolicy",
        ("spec", "risk", "maxPositionUsd"),
        "double(self) > 0.0 && double(self) <= 1000000000000.0",
        lambda s, _: 0.0 < _double(s) <= 1e12,
    ),
    "risk.maxLeverage must be between 1 and 125": CelRule(
        "TradingPolicy",
        ("spec", "risk", "maxLeverage"),
        "double(self) >= 1.0 && double(self) <= 125.0",
        lambda s, _: 1.0 <= _double(s) <= 125.0,
    ),
    "risk.maxDrawdownPct must be greater than 0 and at most 100": CelRule(
        "TradingPolicy",
        ("spec", "risk", "maxDrawdownPct"),
        "double(self) > 0.0 && double(self) <= 100.0",
        lambda s, _: 0.0 < _double(s) <= 100.0,
    ),
    "signals.maxPerCycle must not exceed signals.queueSize": CelRule(
        "TradingPolicy",
        ("spec", "signals"),
        "self.maxPerCycle <= self.queueSize",
        lambda s, _: s["maxPerCycle"] <= s["queueSize"],
    ),
    "paper.initialCapitalUsd must be greater than 0 and at most 1000000000000": CelRule(
        "TradingPolicy",
        ("spec", "paper", "initialCapitalUsd"),
        "double(self) > 0.0 && double(self) <= 1000000000000.0",
        lambda s, _: 0.0 < _double(s) <= 1e12,
    ),
    "paper.feeBps must be between 0 and 100": CelRule(
        "TradingPolicy",
        ("spec", "paper", "feeBps"),
        "double(self) <= 100.0",
        lambda s, _: _double(s) <= 100.0,
    ),
    "paper.slippageBps must be between 0 and 1000": CelRule(
        "TradingPolicy",
        ("spec", "paper", "slippageBps"),
        "double(self) <= 1000.0",
        lambda s, _: _double(s) <= 1000.0,
    ),
    "a reason is required when tripping": CelRule(
        "EmergencyStop",
        ("spec",),
        "!self.tripped || size(self.reason) > 0",
        lambda s, _: not s["tripped"] or len(s["reason"]) > 0,
    ),
    "In and NotIn need values; Exists and DoesNotExist take none": CelRule(
        "EmergencyStop",
        ("spec", "policySelector", "matchExpressions", "[]"),
        "self.operator in ['In', 'NotIn'] ? size(self.values) > 0 : size(self.values) == 0",
        lambda s, _: (len(s["values"]) > 0) == (s["operator"] in ("In", "NotIn")),
    ),
    "triggers.drawdownPct must be greater than 0 and at most 100": CelRule(
        "EmergencyStop",
        ("spec", "triggers", "drawdownPct"),
        "double(self) > 0.0 && double(self) <= 100.0",
        lambda s, _: 0.0 < _double(s) <= 100.0,
    ),
    "triggers.flashCrashPct must be greater than 0 and at most 100": CelRule(
        "EmergencyStop",
        ("spec", "triggers", "flashCrashPct"),
        "double(self) > 0.0 && double(self) <= 100.0",
        lambda s, _: 0.0 < _double(s) <= 100.0,
    ),
    "status.tripCount must not decrease": CelRule(
        "EmergencyStop",
        ("status", "tripCount"),
        "self >= oldSelf",
        lambda s, old: s >= old,
    ),
    "status.resetCount must not decrease": CelRule(
        "EmergencyStop",
        ("status", "resetCount"),
        "self >= oldSelf",
        lambda s, old: s >= old,
    ),
}

# Functions the rules may call: CEL's standard definitions plus the libraries Kubernetes adds
# (lists, strings, regex, URLs, IP/CIDR, quantity). There is no clock: a cooldown cannot be CEL.
K8S_CEL_FUNCTIONS: Final = frozenset(
    {
        # CEL standard definitions and macros
        "size", "has", "int", "uint", "double", "string", "bool", "bytes", "dyn", "type",
        "duration", "timestamp", "matches", "contains", "startsWith", "endsWith",
        "all", "exists", "exists_one", "map", "filter",
        # Kubernetes CEL libraries
        "isSorted", "sum", "min", "max", "indexOf", "lastIndexOf", "charAt", "lowerAscii",
        "upperAscii", "replace", "split", "substring", "trim", "join", "find", "findAll",
        "url", "isURL", "ip", "isIP", "cidr", "isCIDR", "quantity", "isQuantity",
    }
)  # fmt: skip


def normalise_rule(rule: str) -> str:
    return " ".join(rule.split())


def cel_rules_in(kind: str) -> Iterator[tuple[Path_, str, str]]:
    """(path, rule, message) of every x-kubernetes-validations entry in the CRD."""

    def visit(node: JsonObject, path: Path_) -> Iterator[tuple[Path_, str, str]]:
        for entry in node.get("x-kubernetes-validations", []):
            yield path, normalise_rule(entry["rule"]), " ".join(entry.get("message", "").split())
        for name, sub in node.get("properties", {}).items():
            yield from visit(sub, (*path, name))
        if isinstance(node.get("items"), dict):
            yield from visit(node["items"], (*path, "[]"))
        if isinstance(node.get("additionalProperties"), dict):
            yield from visit(node["additionalProperties"], (*path, "{}"))

    return visit(crd_schema(kind), ())


def rule_holds(cel: CelRule, value: Any, old: Any) -> bool:
    try:
        return bool(cel.holds(value, old))
    except (KeyError, TypeError, ValueError):
        return False  # the API server reports an evaluation error: the request is rejected


# --- emulated admission -----------------------------------------------------------------------


@dataclass(frozen=True)
class Violation:
    path: str  # dotted, "" for the document itself
    what: str  # the JSON Schema keyword that failed, or the CEL rule's message


def admit(document: JsonObject, old: JsonObject | None = None) -> list[Violation]:
    """What the API server would object to when ``document`` is created (or replaces ``old``)."""
    kind = document["kind"]
    schema = crd_schema(kind)
    new = apply_defaults(schema, document)
    violations = [
        Violation(".".join(str(part) for part in error.absolute_path), str(error.validator))
        for error in validator(kind).iter_errors(new)
    ]
    previous = apply_defaults(schema, old) if old is not None else MISSING
    for node, value, old_value, path in walk(schema, new, previous):
        where = ".".join(path)
        keys = node.get("x-kubernetes-list-map-keys")
        if keys and isinstance(value, list):
            seen = [_list_map_key(item, keys) for item in value]
            if len(set(seen)) != len(seen):
                violations.append(Violation(where, "x-kubernetes-list-map-keys"))
        for entry in node.get("x-kubernetes-validations", []):
            cel = CEL_RULES[" ".join(entry["message"].split())]
            if cel.is_transition_rule and old_value is MISSING:
                continue  # transition rules run only on updates where the old value exists
            if not rule_holds(cel, value, old_value):
                violations.append(Violation(where, " ".join(entry["message"].split())))
    return violations


def set_path(document: JsonObject, dotted: str, value: Any) -> JsonObject:
    """A copy of ``document`` with ``dotted`` set to ``value`` (or removed, for MISSING)."""
    out = copy.deepcopy(document)
    *parents, last = dotted.split(".")
    node = out
    for name in parents:
        node = node.setdefault(name, {})
    if value is MISSING:
        node.pop(last, None)
    else:
        node[last] = value
    return out


def model_accepts(document: JsonObject) -> bool:
    try:
        parse_policy(document)
    except PolicyError:
        return False
    return True


# --- the CRDs as Kubernetes objects -----------------------------------------------------------

EXPECTED_NAMES: Final = {
    "TradingPolicy": ("tradingpolicies", "tradingpolicy", ["tp"]),
    "EmergencyStop": ("emergencystops", "emergencystop", ["ess"]),
}
# (name, priority): the verbose columns only show with -o wide.
EXPECTED_COLUMNS: Final = {
    "TradingPolicy": [
        ("Mode", 0),
        ("Ready", 0),
        ("Reason", 0),
        ("Revision", 1),
        ("Symbols", 1),
        ("Age", 0),
    ],
    "EmergencyStop": [
        ("State", 0),
        ("Tripped", 0),
        ("Reason", 0),
        ("Positions", 0),
        ("Cooldown-Until", 1),
        ("Trips", 1),
        ("Age", 0),
    ],
}


@pytest.mark.parametrize("kind", KINDS)
def test_each_crd_is_a_namespaced_v1_crd_named_plural_dot_group(kind: str) -> None:
    document = crd(kind)
    plural, singular, short_names = EXPECTED_NAMES[kind]
    spec = document["spec"]
    assert document["apiVersion"] == "apiextensions.k8s.io/v1"
    assert document["kind"] == "CustomResourceDefinition"
    assert spec["group"] == API_GROUP
    assert document["metadata"]["name"] == f"{spec['names']['plural']}.{spec['group']}"
    assert spec["scope"] == "Namespaced"
    assert spec["names"] == {
        "kind": kind,
        "listKind": f"{kind}List",
        "plural": plural,
        "singular": singular,
        "shortNames": short_names,
        "categories": ["qtrader"],
    }
    assert CRD_FILES[kind].name == f"{document['metadata']['name']}.yaml"


@pytest.mark.parametrize("kind", KINDS)
def test_each_crd_serves_and_stores_only_v1alpha1_with_a_status_subresource(kind: str) -> None:
    version = crd_version(kind)
    assert version["name"] == API_VERSION
    assert version["served"] is True
    assert version["storage"] is True
    assert version["subresources"] == {"status": {}}
    assert set(crd_schema(kind)["properties"]) == {
        "apiVersion",
        "kind",
        "metadata",
        "spec",
        "status",
    }
    assert crd_schema(kind)["required"] == ["spec"]


STRUCTURAL_TYPES: Final = frozenset({"object", "array", "string", "integer", "number", "boolean"})


def structural_problems(
    node: JsonObject, path: str, *, in_unkeyed_list: bool = False
) -> Iterator[str]:
    """The rules apiextensions.k8s.io/v1 applies to a schema node (the subset this CRD can hit)."""
    for keyword in ("$ref", "$schema", "id", "definitions", "dependencies", "patternProperties"):
        if keyword in node:
            yield f"{path}: {keyword} is not supported"
    if "additionalItems" in node:
        yield f"{path}: additionalItems is not supported"
    if node.get("uniqueItems"):
        yield f"{path}: uniqueItems cannot be true (use x-kubernetes-list-type: set)"
    if "x-kubernetes-preserve-unknown-fields" in node:
        yield f"{path}: x-kubernetes-preserve-unknown-fields (these schemas need none)"
    if not node.get("x-kubernetes-int-or-string") and node.get("type") not in STRUCTURAL_TYPES:
        yield f"{path}: type must be one of {sorted(STRUCTURAL_TYPES)}, got {node.get('type')!r}"
    if "properties" in node and "additionalProperties" in node:
        yield f"{path}: additionalProperties and properties are mutually exclusive"
    if node.get("additionalProperties") is False:
        yield f"{path}: additionalProperties cannot be false"
    if node.get("type") == "array" and not isinstance(node.get("items"), dict):
        yield f"{path}: an array needs a single items schema"
    for name in node.get("required", []):
        if name not in node.get("properties", {}):
            yield f"{path}: required {name!r} is not a property"
    list_type = node.get("x-kubernetes-list-type")
    if list_type not in (None, "atomic", "set", "map"):
        yield f"{path}: x-kubernetes-list-type {list_type!r}"
    if list_type == "map":
        items = node.get("items", {})
        keys = node.get("x-kubernetes-list-map-keys", [])
        if not keys:
            yield f"{path}: a list-map needs x-kubernetes-list-map-keys"
        for key in keys:
            key_schema = items.get("properties", {}).get(key)
            if key_schema is None or key_schema.get("type") in ("object", "array"):
                yield f"{path}: list-map key {key!r} must be a scalar item property"
            elif key not in items.get("required", []) and "default" not in key_schema:
                yield f"{path}: list-map key {key!r} must be required or defaulted"
    elif "x-kubernetes-list-map-keys" in node:
        yield f"{path}: x-kubernetes-list-map-keys without x-kubernetes-list-type: map"
    for entry in node.get("x-kubernetes-validations", []):
        if not entry.get("rule", "").strip():
            yield f"{path}: a CEL rule is empty"
        message = entry.get("message", "")
        if not message.strip() or "\n" in message.strip():
            yield f"{path}: a CEL rule needs a one-line message"
        if "oldSelf" in entry.get("rule", "") and in_unkeyed_list:
            yield f"{path}: a transition rule under a list that is not a list-map"
    for name, sub in node.get("properties", {}).items():
        yield from structural_problems(sub, f"{path}.{name}", in_unkeyed_list=in_unkeyed_list)
    if isinstance(node.get("items"), dict):
        yield from structural_problems(
            node["items"], f"{path}[]", in_unkeyed_list=in_unkeyed_list or list_type != "map"
        )
    if isinstance(node.get("additionalProperties"), dict):
        yield from structural_problems(
            node["additionalProperties"], f"{path}{{}}", in_unkeyed_list=in_unkeyed_list
        )


@pytest.mark.parametrize("kind", KINDS)
def test_each_crd_schema_is_structural(kind: str) -> None:
    schema = crd_schema(kind)
    assert list(structural_problems(schema, kind)) == []
    # At the root, metadata may only be a plain object (the API server owns ObjectMeta).
    assert schema["properties"]["metadata"] == {"type": "object"}
    assert schema["properties"]["apiVersion"] == {"type": "string"}
    assert schema["properties"]["kind"] == {"type": "string"}


@pytest.mark.parametrize("kind", KINDS)
def test_each_crd_schema_translates_to_a_valid_json_schema(kind: str) -> None:
    jsonschema.Draft202012Validator.check_schema(to_json_schema(crd_schema(kind)))


def all_nodes(node: JsonObject, path: str) -> Iterator[tuple[str, JsonObject]]:
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from all_nodes(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from all_nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from all_nodes(node["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("kind", KINDS)
def test_every_list_string_and_map_in_each_crd_is_bounded(kind: str) -> None:
    unbounded = []
    for path, node in all_nodes(crd_schema(kind), ""):
        if path in (".apiVersion", ".kind"):
            continue  # the API server checks these
        kind_ = node.get("type")
        if kind_ == "array" and "maxItems" not in node:
            unbounded.append(path)
        if kind_ == "string" and not (
            "maxLength" in node or "enum" in node or node.get("format") == "date-time"
        ):
            unbounded.append(path)
        if isinstance(node.get("additionalProperties"), dict) and "maxProperties" not in node:
            unbounded.append(path)
    assert unbounded == []


@pytest.mark.parametrize("kind", KINDS)
def test_every_default_in_each_crd_validates_against_its_own_schema(kind: str) -> None:
    checked = 0
    for path, node in all_nodes(crd_schema(kind), ""):
        if "default" in node:
            defaulted = apply_defaults(node, copy.deepcopy(node["default"]))
            errors = list(
                jsonschema.Draft202012Validator(
                    to_json_schema(node), format_checker=FORMATS
                ).iter_errors(defaulted)
            )
            assert errors == [], path
            checked += 1
    assert checked > 0


METADATA_FIELDS: Final = {"name": "string", "namespace": "string", "creationTimestamp": "date"}
_JSONPATH_SEGMENT = re.compile(
    r"""\.(?P<field>[A-Za-z0-9_-]+)"""  # .name
    r"""|\[\?\(@\.(?P<key>[A-Za-z0-9_]+)\s*==\s*(["'])(?P<value>[^"']*)\3\)\]"""  # [?(@.k=="v")]
)
_COLUMN_TYPES: Final = {
    "integer": {"integer"},
    "number": {"number", "integer"},
    "boolean": {"boolean"},
    "string": {"string", "date", "integer", "number", "boolean", "array"},
}


def resolve_column(kind: str, json_path: str) -> str:
    """The schema type a printer column's jsonPath reaches; fails if it leaves the schema."""
    position = 0
    node = crd_schema(kind)
    parents: list[str] = []
    while position < len(json_path):
        match = _JSONPATH_SEGMENT.match(json_path, position)
        assert match is not None, f"cannot parse {json_path!r} at {position}"
        position = match.end()
        if match["field"]:
            if parents == ["metadata"]:
                assert match["field"] in METADATA_FIELDS, json_path
                assert position == len(json_path), json_path
                return METADATA_FIELDS[match["field"]]
            assert match["field"] in node.get("properties", {}), json_path
            node = node["properties"][match["field"]]
            parents.append(match["field"])
        else:
            assert node.get("type") == "array", json_path
            node = node["items"]
            assert match["key"] in node.get("properties", {}), json_path
    if node.get("format") == "date-time":
        return "date"
    return str(node["type"])


@pytest.mark.parametrize("kind", KINDS)
def test_every_printer_column_points_at_a_field_in_the_schema_with_a_matching_type(
    kind: str,
) -> None:
    columns = crd_version(kind)["additionalPrinterColumns"]
    assert [(c["name"], c.get("priority", 0)) for c in columns] == EXPECTED_COLUMNS[kind]
    for column in columns:
        reached = resolve_column(kind, column["jsonPath"])
        if column["type"] == "date":
            assert reached == "date", column
        else:
            assert reached in _COLUMN_TYPES[column["type"]], column


def test_policy_ready_and_reason_columns_read_the_ready_condition() -> None:
    columns = crd_version("TradingPolicy")["additionalPrinterColumns"]
    paths = {c["name"]: c["jsonPath"] for c in columns}
    assert paths["Ready"] == '.status.conditions[?(@.type=="Ready")].status'
    assert paths["Reason"] == '.status.conditions[?(@.type=="Ready")].reason'


@pytest.mark.parametrize("kind", KINDS)
def test_each_crd_shows_age_from_the_creation_timestamp(kind: str) -> None:
    (age,) = [c for c in crd_version(kind)["additionalPrinterColumns"] if c["name"] == "Age"]
    assert age == {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}


def test_both_crds_shape_conditions_like_metav1_condition() -> None:
    schema = schema_at("TradingPolicy", ("status", "conditions"))
    assert schema_at("EmergencyStop", ("status", "conditions")) == schema
    assert schema["x-kubernetes-list-type"] == "map"
    assert schema["x-kubernetes-list-map-keys"] == ["type"]
    item = schema["items"]
    assert set(item["properties"]) == {
        "type",
        "status",
        "observedGeneration",
        "lastTransitionTime",
        "reason",
        "message",
    }
    assert set(item["required"]) == {"type", "status", "lastTransitionTime", "reason", "message"}
    assert item["properties"]["status"]["enum"] == ["True", "False", "Unknown"]
    assert item["properties"]["lastTransitionTime"]["format"] == "date-time"
    for kind in KINDS:
        assert schema_at(kind, ("status", "observedGeneration"))["type"] == "integer"


# --- examples ---------------------------------------------------------------------------------


def test_examples_hold_at_least_one_document_of_each_kind() -> None:
    kinds = {doc["kind"] for _, doc in example_documents()}
    assert kinds == set(KINDS)


@pytest.mark.parametrize(
    ("path", "document"),
    [
        pytest.param(path, doc, id=f"{path.name}:{doc['metadata']['name']}")
        for path, doc in example_documents()
    ],
)
def test_every_example_is_accepted_by_its_crd(path: Path, document: JsonObject) -> None:
    assert document["apiVersion"] == f"{API_GROUP}/{API_VERSION}"
    assert document["kind"] in KINDS
    assert admit(document) == []


@pytest.mark.parametrize(
    "path", sorted(EXAMPLES_DIR.glob("policy*.yaml")), ids=lambda p: str(p.name)
)
def test_every_policy_example_also_loads_with_load_policy_file(path: Path) -> None:
    policy = load_policy_file(path)
    assert policy.kind == "TradingPolicy"


def test_every_policy_example_obeys_an_emergency_stop_that_is_an_example_too() -> None:
    stops = {
        doc["metadata"]["name"] for _, doc in example_documents() if doc["kind"] == "EmergencyStop"
    }
    for _, doc in example_documents():
        if doc["kind"] == "TradingPolicy":
            spec = apply_defaults(crd_schema("TradingPolicy"), doc)["spec"]
            assert spec["emergencyStopRef"] in stops


# --- defaults ---------------------------------------------------------------------------------


def leaves(value: Any, prefix: Path_ = ()) -> dict[Path_, Any]:
    """Flatten nested mappings to {path: scalar or list}; empty mappings contribute nothing."""
    if isinstance(value, dict):
        out: dict[Path_, Any] = {}
        for name, child in value.items():
            out.update(leaves(child, (*prefix, name)))
        return out
    return {prefix: value}


def same_value(left: Any, right: Any) -> bool:
    numeric = (int, float, str)
    if isinstance(left, numeric) and isinstance(right, numeric):
        try:
            return Decimal(str(left)) == Decimal(str(right))
        except ArithmeticError:
            pass
    return bool(left == right)


def test_trading_policy_defaults_in_the_crd_equal_the_models_defaults() -> None:
    symbols = ["BTCUSDT"]
    from_crd = apply_defaults(
        crd_schema("TradingPolicy")["properties"]["spec"], {"symbols": symbols}
    )
    from_model = TradingPolicySpec(symbols=tuple(symbols)).model_dump(
        mode="json", by_alias=True, exclude_none=True
    )
    crd_leaves, model_leaves = leaves(from_crd), leaves(from_model)
    assert sorted(crd_leaves) == sorted(model_leaves)
    different = {
        path: (crd_leaves[path], model_leaves[path])
        for path in crd_leaves
        if not same_value(crd_leaves[path], model_leaves[path])
    }
    assert different == {}


def test_a_minimal_emergency_stop_is_armed_halting_with_a_five_minute_cooldown() -> None:
    spec = apply_defaults(crd_schema("EmergencyStop")["properties"]["spec"], {})
    assert spec == {
        "tripped": False,
        "reason": "",
        "mode": "Halted",
        "cooldownSeconds": 300,
        "requireManualReset": True,
        "flattenOnTrip": False,
        "ackTimeoutSeconds": 5,
        "reconciliationMode": "Reducing",
    }  # no triggers: every automatic trip is off (but a ban's or a reconciliation's)


# --- the spec mirrors policy.py: names, enums, patterns, bounds -------------------------------


def model_fields(model: type[BaseModel], prefix: Path_ = ()) -> Iterator[tuple[Path_, FieldInfo]]:
    """Every field of the model tree as (camelCase path, field), containers included."""
    for name, info in model.model_fields.items():
        path = (*prefix, info.alias or name)
        yield path, info
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from model_fields(annotation, path)


def schema_fields(node: JsonObject, prefix: Path_ = ()) -> Iterator[Path_]:
    for name, sub in node.get("properties", {}).items():
        yield (*prefix, name)
        yield from schema_fields(sub, (*prefix, name))


def test_the_trading_policy_spec_has_exactly_the_models_fields() -> None:
    spec_schema = schema_at("TradingPolicy", ("spec",))
    assert sorted(schema_fields(spec_schema)) == sorted(
        p for p, _ in model_fields(TradingPolicySpec)
    )
    fields = TradingPolicySpec.model_fields.values()
    required = [info.alias for info in fields if info.is_required()]
    assert spec_schema["required"] == required
    assert spec_schema["properties"]["mode"]["enum"] == [mode.value for mode in TradingMode]


def _pattern(metadata: list[Any]) -> str | None:
    for item in metadata:
        if isinstance(item, FieldInfo):
            found = _pattern(item.metadata)
            if found:
                return found
        elif getattr(item, "pattern", None):
            return str(item.pattern)
    return None


def test_patterns_and_lengths_in_the_crd_equal_the_models() -> None:
    compared = 0
    for path, info in model_fields(TradingPolicySpec):
        node = schema_at("TradingPolicy", ("spec", *path))
        if typing.get_origin(info.annotation) is tuple:  # symbols: a list of patterned strings
            (item_type, _) = typing.get_args(info.annotation)
            assert node["items"]["pattern"] == _pattern(list(typing.get_args(item_type)[1:]))
            minimum, maximum = "minItems", "maxItems"
        else:
            if (pattern := _pattern(info.metadata)) is not None:
                assert node["pattern"] == pattern, path
                compared += 1
            minimum, maximum = "minLength", "maxLength"
        for item in info.metadata:
            if isinstance(item, MinLen):
                assert node.get(minimum) == item.min_length, (path, minimum)
                compared += 1
            elif isinstance(item, MaxLen):
                assert node.get(maximum) == item.max_length, (path, maximum)
                compared += 1
    assert compared >= 5


NUMERIC_TYPES: Final = {int: "integer", float: "number", Decimal: "string"}
DECIMAL_PATTERN: Final = r"^[0-9]+(\.[0-9]+)?$"
_BOUND_KEYWORDS: Final = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def test_numeric_bounds_in_the_crd_equal_the_models() -> None:
    for path, info in model_fields(TradingPolicySpec):
        if info.annotation not in NUMERIC_TYPES:
            continue
        node = schema_at("TradingPolicy", ("spec", *path))
        assert node["type"] == NUMERIC_TYPES[info.annotation], path
        if info.annotation is Decimal:
            # Decimal strings: the range is a CEL rule (probed below), the syntax a pattern.
            assert node["pattern"] == DECIMAL_PATTERN, path
            assert node.get("x-kubernetes-validations"), path
            continue
        expected: JsonObject = {}
        for item in info.metadata:
            if isinstance(item, Ge):
                expected["minimum"] = item.ge
            elif isinstance(item, Gt):
                expected.update(minimum=item.gt, exclusiveMinimum=True)
            elif isinstance(item, Le):
                expected["maximum"] = item.le
            elif isinstance(item, Lt):
                expected.update(maximum=item.lt, exclusiveMaximum=True)
        actual = {key: node[key] for key in _BOUND_KEYWORDS if key in node}
        assert actual == expected, path


@dataclass(frozen=True)
class Probe:
    path: Path_  # under spec
    value: Any
    valid: bool

    @property
    def id(self) -> str:
        shown = repr(self.value)
        shown = shown if len(shown) <= 24 else f"{shown[:20]}...({len(shown)})"
        return f"{'.'.join(self.path)}={shown}-{'ok' if self.valid else 'bad'}"


def _probe(path: Path_, annotation: Any, bound: Any, steps: int, valid: bool) -> Probe:
    """A value ``steps`` steps (1 for int, 0.01 otherwise) from ``bound``, in the field's type."""
    step = Decimal(1) if annotation is int else Decimal("0.01")
    value = Decimal(str(bound)) + steps * step
    if annotation is int:
        return Probe(path, int(value), valid)
    if annotation is float:
        return Probe(path, float(value), valid)
    return Probe(path, str(value), valid)  # Decimal: a decimal string, as in the examples


def numeric_probes() -> list[Probe]:
    """The model's numeric bounds, each probed on and just beyond the boundary."""
    probes: list[Probe] = []
    for path, info in model_fields(TradingPolicySpec):
        kind = info.annotation
        if kind not in NUMERIC_TYPES:
            continue
        for item in info.metadata:
            if isinstance(item, Ge):
                probes += [
                    _probe(path, kind, item.ge, 0, True),
                    _probe(path, kind, item.ge, -1, False),
                ]
            elif isinstance(item, Gt):
                probes += [
                    _probe(path, kind, item.gt, 0, False),
                    _probe(path, kind, item.gt, 1, True),
                ]
            elif isinstance(item, Le):
                probes += [
                    _probe(path, kind, item.le, 0, True),
                    _probe(path, kind, item.le, 1, False),
                ]
            elif isinstance(item, Lt):
                probes += [
                    _probe(path, kind, item.lt, 0, False),
                    _probe(path, kind, item.lt, -1, True),
                ]
    return probes


WORKLOAD_RESOURCES: Final = ("workloads", "execution", "resources")
STRING_PROBES: Final = [
    Probe(("mode",), "paper", True),
    Probe(("mode",), "testnet", True),
    Probe(("mode",), "live", True),
    Probe(("mode",), "Paper", False),
    Probe(("mode",), "", False),
    Probe(("symbols",), ["BTCUSDT"], True),
    Probe(("symbols",), [], False),
    Probe(("symbols",), [f"S{n:03d}" for n in range(50)], True),
    Probe(("symbols",), [f"S{n:03d}" for n in range(51)], False),
    Probe(("symbols",), ["BTCUSDT", "BTCUSDT"], False),
    Probe(("symbols",), ["btcusdt"], False),
    Probe(("symbols",), ["B"], False),
    Probe(("symbols",), ["A" * 20], True),
    Probe(("symbols",), ["A" * 21], False),
    Probe(("emergencyStopRef",), "ess-2", True),
    Probe(("emergencyStopRef",), "a" * 63, True),
    Probe(("emergencyStopRef",), "-ess", False),
    Probe(("emergencyStopRef",), "Main", False),
    Probe(("emergencyStopRef",), "main_stop", False),
    Probe(("model", "ref"), "/models/v2.onnx", True),
    Probe(("model", "ref"), "x" * 512, True),
    Probe(("model", "ref"), "x" * 513, False),
    Probe(("model", "ref"), "", False),
    Probe(("workloads", "inference", "image"), "ghcr.io/qtrader/inference:0.1.0", True),
    Probe((*WORKLOAD_RESOURCES, "requests", "cpu"), "500m", True),
    Probe((*WORKLOAD_RESOURCES, "requests", "cpu"), "1.5", True),
    Probe((*WORKLOAD_RESOURCES, "requests", "cpu"), "500 m", False),
    Probe((*WORKLOAD_RESOURCES, "requests", "cpu"), "m", False),
    Probe((*WORKLOAD_RESOURCES, "limits", "memory"), "256Mi", True),
    Probe((*WORKLOAD_RESOURCES, "limits", "memory"), "1G", True),
    Probe((*WORKLOAD_RESOURCES, "limits", "memory"), "256MB", False),
    Probe((*WORKLOAD_RESOURCES, "limits", "memory"), "-1Gi", False),
    Probe(("risk", "maxPositionUsd"), "1000.50", True),
    Probe(("risk", "maxPositionUsd"), "1,000", False),
    Probe(("risk", "maxPositionUsd"), "abc", False),
]


def probe_document(probe: Probe) -> JsonObject:
    """A valid testnet policy (no paper buying-power rule; a roomy queue) with one field changed."""
    base: JsonObject = {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": "TradingPolicy",
        "metadata": {"name": "probe"},
        "spec": {
            "mode": "testnet",
            "symbols": ["BTCUSDT"],
            "signals": {"queueSize": 10_000, "maxPerCycle": 1},
        },
    }
    return set_path(base, ".".join(("spec", *probe.path)), probe.value)


def all_probes() -> list[Probe]:
    return numeric_probes() + STRING_PROBES


def test_every_numeric_field_of_the_model_is_bounded_and_probed() -> None:
    numeric = {p for p, info in model_fields(TradingPolicySpec) if info.annotation in NUMERIC_TYPES}
    probed = {probe.path for probe in numeric_probes()}
    assert numeric == probed
    assert len(numeric) >= 18


@pytest.mark.parametrize("probe", all_probes(), ids=lambda p: p.id)
def test_the_crd_and_the_model_agree_on_each_boundary(probe: Probe) -> None:
    document = probe_document(probe)
    assert model_accepts(document) is probe.valid
    assert (admit(document) == []) is probe.valid, admit(document)


# Where the CRD is knowingly stricter than policy.py. Each entry is accepted by the model and
# rejected by the CRD; when policy.py is tightened, its entry fails here and should be removed.
KNOWN_DIVERGENCES: Final = [
    # Decimals are strings in the CRD; lax pydantic also takes YAML numbers for Decimal fields,
    Probe(("risk", "maxLeverage"), 3, False),
    # and numeric strings for int and float fields.
    Probe(("signals", "queueSize"), "100", False),
    Probe(("signals", "ttlSeconds"), "30", False),
    Probe(("signals", "intentTtlSeconds"), "5", False),
    Probe(("signals", "maxIntentBacklog"), "50", False),
    # The CRD's decimal pattern is plain digits; Decimal also parses exponents and a bare point.
    Probe(("risk", "maxPositionUsd"), "1e3", False),
    Probe(("risk", "maxPositionUsd"), ".5", False),
    # The CRD bounds every string (CEL cost estimation, object size); the model leaves these open.
    Probe(("emergencyStopRef",), "a" * 64, False),
    Probe(("workloads", "marketdata", "image"), "x" * 513, False),
    Probe((*WORKLOAD_RESOURCES, "requests", "cpu"), "1" * 33, False),
]


@pytest.mark.parametrize("probe", KNOWN_DIVERGENCES, ids=lambda p: p.id)
def test_known_divergences_are_accepted_by_the_model_and_rejected_by_the_crd(probe: Probe) -> None:
    document = probe_document(probe)
    assert model_accepts(document)
    assert admit(document) != []


# --- counter-examples -------------------------------------------------------------------------


@dataclass(frozen=True)
class CounterExample:
    id: str
    example: str  # file under examples/
    changes: dict[str, Any]  # dotted path -> new value (MISSING removes the field)
    expected: Violation

    def document(self) -> JsonObject:
        document = example(self.example)
        for dotted, value in self.changes.items():
            document = set_path(document, dotted, value)
        return document


def _policy(id_: str, changes: dict[str, Any], path: str, what: str) -> CounterExample:
    return CounterExample(id_, "policy.yaml", changes, Violation(path, what))


def _stop(id_: str, changes: dict[str, Any], path: str, what: str) -> CounterExample:
    return CounterExample(id_, "emergencystop.yaml", changes, Violation(path, what))


POLICY_COUNTER_EXAMPLES: Final = [
    _policy("unknown-field", {"spec.risk.maxPositions": 3}, "spec.risk", "additionalProperties"),
    _policy("bad-mode", {"spec.mode": "yolo"}, "spec.mode", "enum"),
    _policy("no-symbols", {"spec.symbols": MISSING}, "spec", "required"),
    _policy("empty-symbols", {"spec.symbols": []}, "spec.symbols", "minItems"),
    _policy("bad-symbol", {"spec.symbols": ["btc-usdt"]}, "spec.symbols.0", "pattern"),
    _policy(
        "duplicate-symbol", {"spec.symbols": ["BTCUSDT", "BTCUSDT"]}, "spec.symbols", "uniqueItems"
    ),
    _policy(
        "min-confidence-1.5", {"spec.risk.minConfidence": 1.5}, "spec.risk.minConfidence", "maximum"
    ),
    _policy(
        "replicas-50",
        {"spec.workloads.execution.replicas": 50},
        "spec.workloads.execution.replicas",
        "maximum",
    ),
    _policy(
        "max-per-cycle-over-queue-size",
        {"spec.signals.queueSize": 5, "spec.signals.maxPerCycle": 10},
        "spec.signals",
        "signals.maxPerCycle must not exceed signals.queueSize",
    ),
    _policy(
        "leverage-200",
        {"spec.risk.maxLeverage": "200"},
        "spec.risk.maxLeverage",
        "risk.maxLeverage must be between 1 and 125",
    ),
    _policy(
        "zero-drawdown",
        {"spec.risk.maxDrawdownPct": "0"},
        "spec.risk.maxDrawdownPct",
        "risk.maxDrawdownPct must be greater than 0 and at most 100",
    ),
    _policy(
        "position-beyond-paper-buying-power",
        {"spec.risk.maxPositionUsd": "30000.01"},  # 10000 capital x 3 leverage = 30000
        "spec",
        PAPER_BUYING_POWER,
    ),
    _policy(
        "position-as-grouped-digits",
        {"spec.risk.maxPositionUsd": "1,000"},
        "spec.risk.maxPositionUsd",
        "pattern",
    ),
    _policy(
        "ttl-zero", {"spec.signals.ttlSeconds": 0}, "spec.signals.ttlSeconds", "exclusiveMinimum"
    ),
    _policy(
        "intent-ttl-zero",
        {"spec.signals.intentTtlSeconds": 0},
        "spec.signals.intentTtlSeconds",
        "exclusiveMinimum",
    ),
    _policy(
        "intent-backlog-zero",
        {"spec.signals.maxIntentBacklog": 0},
        "spec.signals.maxIntentBacklog",
        "minimum",
    ),
    _policy("bad-stop-ref", {"spec.emergencyStopRef": "Main"}, "spec.emergencyStopRef", "pattern"),
    _policy(
        "refresh-over-a-day",
        {"spec.policyRefreshSeconds": 86_401},
        "spec.policyRefreshSeconds",
        "maximum",
    ),
]

STOP_COUNTER_EXAMPLES: Final = [
    _stop(
        "tripped-without-reason",
        {"spec.tripped": True},
        "spec",
        "a reason is required when tripping",
    ),
    _stop(
        "tripped-with-empty-reason",
        {"spec.tripped": True, "spec.reason": ""},
        "spec",
        "a reason is required when tripping",
    ),
    _stop(
        "tripped-with-reason-removed",
        {"spec.tripped": True, "spec.reason": MISSING},  # defaulted to "", then rejected
        "spec",
        "a reason is required when tripping",
    ),
    _stop("bad-mode", {"spec.mode": "Paused"}, "spec.mode", "enum"),
    _stop(
        "selector-in-without-values",
        {"spec.policySelector": {"matchExpressions": [{"key": "desk", "operator": "In"}]}},
        "spec.policySelector.matchExpressions.0",
        "In and NotIn need values; Exists and DoesNotExist take none",
    ),
    _stop(
        "selector-exists-with-values",
        {
            "spec.policySelector": {
                "matchExpressions": [{"key": "desk", "operator": "Exists", "values": ["x"]}]
            }
        },
        "spec.policySelector.matchExpressions.0",
        "In and NotIn need values; Exists and DoesNotExist take none",
    ),
    _stop(
        "selector-bad-operator",
        {"spec.policySelector": {"matchExpressions": [{"key": "d", "operator": "Gt"}]}},
        "spec.policySelector.matchExpressions.0.operator",
        "enum",
    ),
    _stop(
        "selector-typo",
        {"spec.policySelector": {"matchLabel": {"desk": "btc"}}},
        "spec.policySelector",
        "additionalProperties",
    ),
    _stop("cooldown-minus-one", {"spec.cooldownSeconds": -1}, "spec.cooldownSeconds", "minimum"),
    _stop(
        "cooldown-over-a-day", {"spec.cooldownSeconds": 86_401}, "spec.cooldownSeconds", "maximum"
    ),
    _stop("unknown-field", {"spec.autoReset": True}, "spec", "additionalProperties"),
    _stop("no-spec", {"spec": MISSING}, "", "required"),
    _stop("reason-too-long", {"spec.reason": "x" * 1025}, "spec.reason", "maxLength"),
    _stop(
        "zero-drawdown-trigger",
        {"spec.triggers.drawdownPct": "0"},
        "spec.triggers.drawdownPct",
        "triggers.drawdownPct must be greater than 0 and at most 100",
    ),
    _stop(
        "flash-crash-over-100",
        {"spec.triggers.flashCrashPct": "100.5"},
        "spec.triggers.flashCrashPct",
        "triggers.flashCrashPct must be greater than 0 and at most 100",
    ),
    _stop(
        "percent-sign",
        {"spec.triggers.drawdownPct": "3%"},
        "spec.triggers.drawdownPct",
        "pattern",
    ),
    _stop(
        "flash-crash-window-zero",
        {"spec.triggers.flashCrashWindowSeconds": 0},
        "spec.triggers.flashCrashWindowSeconds",
        "minimum",
    ),
    _stop(
        "stale-data-over-an-hour",
        {"spec.triggers.staleMarketDataSeconds": 3601},
        "spec.triggers.staleMarketDataSeconds",
        "maximum",
    ),
    _stop(
        "error-rate-zero",
        {"spec.triggers.executionErrorRate": 0},
        "spec.triggers.executionErrorRate",
        "exclusiveMinimum",
    ),
    _stop(
        "error-rate-over-one",
        {"spec.triggers.executionErrorRate": 1.5},
        "spec.triggers.executionErrorRate",
        "maximum",
    ),
    _stop("ack-timeout-zero", {"spec.ackTimeoutSeconds": 0}, "spec.ackTimeoutSeconds", "minimum"),
    _stop("ack-timeout-string", {"spec.ackTimeoutSeconds": "5"}, "spec.ackTimeoutSeconds", "type"),
]

COUNTER_EXAMPLES: Final = POLICY_COUNTER_EXAMPLES + STOP_COUNTER_EXAMPLES


@pytest.mark.parametrize(
    "case", COUNTER_EXAMPLES, ids=lambda c: f"{c.example.removesuffix('.yaml')}:{c.id}"
)
def test_each_counter_example_is_rejected_for_the_expected_reason(case: CounterExample) -> None:
    assert case.expected in admit(case.document())


@pytest.mark.parametrize("case", POLICY_COUNTER_EXAMPLES, ids=lambda c: c.id)
def test_each_policy_counter_example_is_rejected_by_the_model_too(case: CounterExample) -> None:
    with pytest.raises(PolicyError):
        parse_policy(case.document())


def test_a_tripped_stop_with_a_reason_is_accepted() -> None:
    document = example("emergencystop.yaml")
    document["spec"].update(tripped=True, reason="manual: exchange maintenance", mode="Reducing")
    assert admit(document) == []


def test_a_policy_at_exactly_its_paper_buying_power_is_accepted() -> None:
    document = set_path(example("policy.yaml"), "spec.risk.maxPositionUsd", "30000")
    assert admit(document) == []
    assert model_accepts(document)


# --- status -----------------------------------------------------------------------------------

READY: Final[JsonObject] = {
    "type": "Ready",
    "status": "True",
    "observedGeneration": 2,
    "lastTransitionTime": "2026-01-05T10:00:00Z",
    "reason": "Published",
    "message": "revision 7 published",
}
POLICY_STATUS: Final[JsonObject] = {
    "observedGeneration": 2,
    "conditions": [READY],
    "workloads": {"execution": {"desired": 1, "ready": 1}, "inference": {"desired": 1, "ready": 0}},
    "publishedRevision": 7,
    "invalidReason": "",
}
STOP_STATUS: Final[JsonObject] = {
    "state": "Tripped",
    "reason": "drawdown 3.4% >= 3%",
    "trippedAt": "2026-01-05T10:00:00.123Z",
    "trippedBy": "operator/drawdown-trigger",
    "cooldownUntil": "2026-01-05T10:05:00+00:00",
    "tripCount": 3,
    "resetCount": 2,
    "latchRevision": 12,
    "acknowledgements": [
        {
            "worker": "execution-0",
            "revision": 12,
            "at": "2026-01-05T10:00:00.500Z",
            "state": "HALTED",
            "openOrdersCancelled": 2,
        }
    ],
    "pendingWorkers": ["execution-1"],
    "observedGeneration": 5,
    "conditions": [{**READY, "reason": "LatchAcknowledged", "message": "1 of 2 workers"}],
}


def with_status(example_name: str, status: JsonObject) -> JsonObject:
    document = example(example_name)
    document["status"] = copy.deepcopy(status)
    return document


def test_a_status_the_operator_would_write_is_accepted_for_each_kind() -> None:
    assert admit(with_status("policy.yaml", POLICY_STATUS)) == []
    assert admit(with_status("emergencystop.yaml", STOP_STATUS)) == []


@pytest.mark.parametrize(
    ("example_name", "status", "dotted", "value", "expected"),
    [
        pytest.param(
            "policy.yaml",
            POLICY_STATUS,
            "status.conditions",
            [READY, {**READY, "status": "False"}],
            Violation("status.conditions", "x-kubernetes-list-map-keys"),
            id="two-ready-conditions",
        ),
        pytest.param(
            "policy.yaml",
            POLICY_STATUS,
            "status.conditions",
            [{**READY, "status": "Maybe"}],
            Violation("status.conditions.0.status", "enum"),
            id="condition-status-maybe",
        ),
        pytest.param(
            "policy.yaml",
            POLICY_STATUS,
            "status.conditions",
            [{**READY, "lastTransitionTime": "yesterday"}],
            Violation("status.conditions.0.lastTransitionTime", "format"),
            id="condition-time-not-rfc3339",
        ),
        pytest.param(
            "policy.yaml",
            POLICY_STATUS,
            "status.conditions",
            [{key: v for key, v in READY.items() if key != "reason"}],
            Violation("status.conditions.0", "required"),
            id="condition-without-reason",
        ),
        pytest.param(
            "policy.yaml",
            POLICY_STATUS,
            "status.phase",
            "Running",
            Violation("status", "additionalProperties"),
            id="phase-is-not-part-of-the-api",
        ),
        pytest.param(
            "emergencystop.yaml",
            STOP_STATUS,
            "status.state",
            "Paused",
            Violation("status.state", "enum"),
            id="stop-state-paused",
        ),
        pytest.param(
            "emergencystop.yaml",
            STOP_STATUS,
            "status.acknowledgements",
            [{"worker": "execution-0"}, {"worker": "execution-0", "revision": 1}],
            Violation("status.acknowledgements", "x-kubernetes-list-map-keys"),
            id="two-acks-from-one-worker",
        ),
        pytest.param(
            "emergencystop.yaml",
            STOP_STATUS,
            "status.pendingWorkers",
            ["execution-1", "execution-1"],
            Violation("status.pendingWorkers", "uniqueItems"),
            id="pending-worker-twice",
        ),
    ],
)
def test_a_malformed_status_is_rejected(
    example_name: str, status: JsonObject, dotted: str, value: Any, expected: Violation
) -> None:
    document = set_path(with_status(example_name, status), dotted, value)
    assert expected in admit(document)


@pytest.mark.parametrize("counter", ["tripCount", "resetCount"])
def test_stop_counters_in_status_never_decrease(counter: str) -> None:
    old = with_status("emergencystop.yaml", STOP_STATUS)
    lower = set_path(old, f"status.{counter}", STOP_STATUS[counter] - 1)
    higher = set_path(old, f"status.{counter}", STOP_STATUS[counter] + 1)
    assert Violation(f"status.{counter}", f"status.{counter} must not decrease") in admit(
        lower, old
    )
    assert admit(higher, old) == []
    assert admit(lower) == []  # a create has no old value: transition rules do not run


# --- CEL --------------------------------------------------------------------------------------


def test_the_crds_hold_exactly_the_cel_rules_listed_here() -> None:
    in_crds = {
        (kind, path, rule, message) for kind in KINDS for path, rule, message in cel_rules_in(kind)
    }
    listed = {
        (cel.kind, cel.path, normalise_rule(cel.rule), message)
        for message, cel in CEL_RULES.items()
    }
    assert in_crds == listed
    messages = [message for kind in KINDS for _, _, message in cel_rules_in(kind)]
    assert len(messages) == len(set(messages)), "messages key the rules, so they must be unique"


def test_cel_rules_call_only_functions_kubernetes_cel_provides() -> None:
    called = {
        name
        for cel in CEL_RULES.values()
        for name in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*\(", cel.rule)
    }
    assert called <= K8S_CEL_FUNCTIONS
    assert "double" in called  # decimal strings are range-checked through double()


def test_cel_rules_read_only_fields_that_are_required_or_defaulted() -> None:
    """Otherwise a rule meets a missing field and fails with "no such key" on a valid object."""
    for cel in CEL_RULES.values():
        for reference in re.findall(r"\bself((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", cel.rule):
            node = schema_at(cel.kind, cel.path)
            for name in reference.lstrip(".").split("."):
                sub = node["properties"][name]
                assert name in node.get("required", []) or "default" in sub, (cel.rule, name)
                node = sub


def test_transition_rules_sit_only_on_correlatable_fields() -> None:
    for cel in CEL_RULES.values():
        if cel.is_transition_rule:
            assert "[]" not in cel.path, cel.path
            assert "{}" not in cel.path, cel.path


def test_cel_predicates_reject_what_the_rules_are_meant_to_reject() -> None:
    def holds(message: str, value: Any, old: Any = MISSING) -> bool:
        return rule_holds(CEL_RULES[message], value, old)

    assert not holds("risk.maxLeverage must be between 1 and 125", "0.99")
    assert holds("risk.maxLeverage must be between 1 and 125", "125")
    assert not holds("risk.maxLeverage must be between 1 and 125", "not a number")
    assert not holds("a reason is required when tripping", {"tripped": True, "reason": ""})
    assert holds("a reason is required when tripping", {"tripped": False, "reason": ""})
    assert not holds(
        "signals.maxPerCycle must not exceed signals.queueSize",
        {"maxPerCycle": 11, "queueSize": 10},
    )
    assert not holds("status.tripCount must not decrease", 1, 2)


def cel_cases() -> list[tuple[CelRule, Any, Any]]:
    """(rule, self, oldSelf) for every rule node in every document these tests admit."""
    documents: list[tuple[JsonObject, JsonObject | None]] = [
        (d, None) for _, d in example_documents()
    ]
    documents += [(c.document(), None) for c in COUNTER_EXAMPLES]
    documents += [(probe_document(p), None) for p in all_probes() + KNOWN_DIVERGENCES]
    stop = with_status("emergencystop.yaml", STOP_STATUS)
    for counter in ("tripCount", "resetCount"):
        for delta in (-1, 0, 1):
            new = set_path(stop, f"status.{counter}", STOP_STATUS[counter] + delta)
            documents.append((new, stop))
    cases = []
    for document, old in documents:
        schema = crd_schema(document["kind"])
        previous = apply_defaults(schema, old) if old is not None else MISSING
        for node, value, old_value, _ in walk(schema, apply_defaults(schema, document), previous):
            for entry in node.get("x-kubernetes-validations", []):
                cel = CEL_RULES[" ".join(entry["message"].split())]
                if not (cel.is_transition_rule and old_value is MISSING):
                    cases.append((cel, value, old_value))
    return cases


def test_cel_python_agrees_with_the_python_predicates_on_every_document_here() -> None:
    """The CEL text itself, run by cel-python (not cel-go), on every rule node the tests reach."""
    celpy: Any = pytest.importorskip("celpy")
    environment = celpy.Environment()
    programs = {
        cel.rule: environment.program(environment.compile(cel.rule)) for cel in CEL_RULES.values()
    }
    outcomes: dict[str, set[bool]] = {message: set() for message in CEL_RULES}
    messages = {id(cel): message for message, cel in CEL_RULES.items()}
    for cel, value, old in cel_cases():
        activation = {"self": celpy.json_to_cel(value)}
        if old is not MISSING:
            activation["oldSelf"] = celpy.json_to_cel(old)
        try:
            result = programs[cel.rule].evaluate(activation)
        except celpy.CELEvalError:
            result = None
        cel_holds = isinstance(result, celpy.celtypes.BoolType) and bool(result)
        assert cel_holds == rule_holds(cel, value, old), (cel.rule, value, old)
        outcomes[messages[id(cel)]].add(cel_holds)
    # every rule was seen both holding and failing, so the agreement is not vacuous
    assert {message: seen for message, seen in outcomes.items() if seen != {True, False}} == {}
