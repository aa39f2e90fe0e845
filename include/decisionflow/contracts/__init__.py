"""Event contracts: versioned JSON Schemas (draft 2020-12) for the Kafka topics, and their registry.

Plain Python (``jsonschema`` only): no Airflow, Kafka or Spark needed to import or use it.

* :data:`TOPICS` - every topic with its partitions, retention and contract, dead-letter topics included.
* :func:`contract` - a topic's :class:`Contract`; ``contract("transactions").fields`` lists per-field rules
  (type, required, nullable, enum, bounds, length, pattern, formats) as plain data, so the Spark job can build
  the same checks in SQL instead of restating them (see :meth:`Field.as_dict`, :meth:`Contract.spark_ddl`).
* :func:`validate` - human-readable violations of one decoded record, each naming its field
  (``"amount: -3 is less than or equal to the minimum of 0"``); :func:`validate_message` does the same for
  raw Kafka bytes (tombstones and malformed JSON included).
* :func:`check_compatible` - refuses a breaking schema change with a message naming the field.

Unknown fields: **allowed, and reported**. A producer on a newer, compatible contract may add optional
fields before every consumer knows them, so an extra field never makes a record invalid
(``"additionalProperties": true`` in every schema, checked at load). :func:`unknown_fields` and
:meth:`Contract.check` report them so ingestion can count them and keep them (e.g. in a raw column) rather
than drop them silently. ``validate(..., strict=True)`` turns them into violations for callers that want that.

Versions: a record says which contract it was written against in ``schema_version``; a schema file is
``<topic>.v<N>.json`` with ``"x-schema-version": N`` and ``"schema_version": {"const": N}``. Every version must
be compatible with the one before it (:func:`check_compatible`, enforced by the unit tests).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any, Iterable

from jsonschema import Draft202012Validator, FormatChecker
from decisionflow.exceptions import NonRetryableError

__all__ = [
    "ADDITIONAL_FIELDS_POLICY",
    "CASE_NOTES",
    "Contract",
    "DLQ_SUFFIX",
    "Field",
    "IncompatibleSchemaError",
    "LABELS",
    "SOURCE_TOPICS",
    "TOPICS",
    "TRANSACTIONS",
    "TopicSpec",
    "ValidationResult",
    "check_compatible",
    "contract",
    "dlq_topic",
    "load_schema",
    "unknown_fields",
    "validate",
    "validate_message",
    "versions",
]

SCHEMA_DIR = Path(__file__).resolve().parent

TRANSACTIONS = "transactions"
LABELS = "transaction-labels"
CASE_NOTES = "case-notes"
#: Topics that carry contracted events, in the order the loop depends on them.
SOURCE_TOPICS: tuple[str, ...] = (TRANSACTIONS, LABELS, CASE_NOTES)
DLQ_SUFFIX = ".dlq"

#: What happens to fields a contract does not declare. Explicit on purpose (see the module docstring):
#: "allow" = the record stays valid and the field is reported by ``unknown_fields``/``Contract.check``.
ADDITIONAL_FIELDS_POLICY = "allow"

_DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class TopicSpec:
    """One Kafka topic as the platform creates it. ``contract`` is the topic whose schema its values follow."""

    name: str
    partitions: int
    retention_ms: int
    contract: str | None
    key: str | None = "account_id"
    dlq: bool = False
    config: dict[str, str] = field(default_factory=dict)

    def topic_config(self) -> dict[str, str]:
        """Broker-side topic properties (``retention.ms`` included) for ``NewTopic(config=...)``."""
        return {"retention.ms": str(self.retention_ms), **self.config}


def dlq_topic(topic: str) -> str:
    """Dead-letter topic of ``topic``: where ingestion parks what it cannot accept (``transactions.dlq``)."""
    if topic.endswith(DLQ_SUFFIX):
        raise ValueError(f"{topic!r} is already a dead-letter topic")
    return f"{topic}{DLQ_SUFFIX}"


def _topics() -> dict[str, TopicSpec]:
    # cleanup.policy=delete: a null value (tombstone) is an ordinary message here, not a compaction marker.
    # max.message.bytes matches the broker's message.max.bytes (1 MiB + batch overhead).
    common = {"cleanup.policy": "delete", "max.message.bytes": "1048588"}
    sources = {
        # Transactions feed streaming features: a week of replay is enough, the lake keeps history.
        TRANSACTIONS: TopicSpec(TRANSACTIONS, 3, 7 * _DAY_MS, TRANSACTIONS, config=common),
        # Labels and notes trickle in for weeks (chargebacks); keep them long enough to rebuild joins.
        LABELS: TopicSpec(LABELS, 3, 30 * _DAY_MS, LABELS, config=common),
        CASE_NOTES: TopicSpec(CASE_NOTES, 3, 30 * _DAY_MS, CASE_NOTES, config=common),
    }
    specs = dict(sources)
    for name, spec in sources.items():
        dlq = dlq_topic(name)
        specs[dlq] = TopicSpec(dlq, 3, 14 * _DAY_MS, None, key=spec.key, dlq=True, config=common)
    return specs


#: Every topic of the platform with its defaults: partitions 3, retention per topic, ``<topic>.dlq`` included.
TOPICS: dict[str, TopicSpec] = _topics()


# -- formats ------------------------------------------------------------------------------------------------
_RFC3339 = re.compile(
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})$"
)


def _is_rfc3339(value: object) -> bool:
    """RFC 3339 ``date-time`` (jsonschema only checks it with an optional extra package, so we do it here)."""
    if not isinstance(value, str):
        return True  # formats apply to strings only
    if not _RFC3339.match(value):
        return False
    text = value.upper().replace("Z", "+00:00")
    head, _, rest = text.partition(".")
    if rest:  # fromisoformat wants at most 6 fraction digits
        digits = re.match(r"[0-9]+", rest).group(0)
        text = f"{head}.{digits[:6].ljust(6, '0')}{rest[len(digits):]}"
    try:
        datetime.fromisoformat(text)
    except ValueError:
        return False
    return True


_FORMATS = FormatChecker(formats=("uuid", "ipv4", "ipv6", "date", "email"))
_FORMATS.checks("date-time")(_is_rfc3339)


# -- schema files -------------------------------------------------------------------------------------------
_FILE_NAME = re.compile(r"^(?P<topic>[a-z0-9-]+)\.v(?P<version>[0-9]+)\.json$")


@cache
def _catalog() -> dict[str, dict[int, dict]]:
    catalog: dict[str, dict[int, dict]] = {}
    for path in sorted(SCHEMA_DIR.glob("*.v*.json")):
        match = _FILE_NAME.match(path.name)
        if not match:
            raise ValueError(f"contract file {path.name}: expected <topic>.v<N>.json")
        schema = json.loads(path.read_text())
        topic, version = match["topic"], int(match["version"])
        Draft202012Validator.check_schema(schema)
        problems = []
        if schema.get("x-topic") != topic:
            problems.append(f"x-topic is {schema.get('x-topic')!r}, the file name says {topic!r}")
        if schema.get("x-schema-version") != version:
            problems.append(f"x-schema-version is {schema.get('x-schema-version')!r}, the file name says {version}")
        if schema.get("properties", {}).get("schema_version", {}).get("const") != version:
            problems.append(f"properties.schema_version must be {{'const': {version}}}")
        if "schema_version" not in schema.get("required", []):
            problems.append("schema_version must be required")
        if schema.get("additionalProperties") is not True:
            problems.append("additionalProperties must be true (unknown fields are allowed and reported)")
        if problems:
            raise ValueError(f"contract file {path.name}: " + "; ".join(problems))
        catalog.setdefault(topic, {})[version] = schema
    return catalog


def versions(topic: str) -> list[int]:
    """Known contract versions of ``topic``, oldest first."""
    try:
        return sorted(_catalog()[topic])
    except KeyError:
        raise KeyError(f"no contract for topic {topic!r}; known: {sorted(_catalog())}") from None


def load_schema(topic: str, version: int | None = None) -> dict:
    """The JSON Schema of ``topic`` (latest version unless ``version``); a fresh copy, safe to modify."""
    known = versions(topic)
    version = known[-1] if version is None else version
    if version not in known:
        raise KeyError(f"no version {version} of contract {topic!r}; known: {known}")
    return json.loads(json.dumps(_catalog()[topic][version]))


# -- per-field rules ----------------------------------------------------------------------------------------
_SQL_TYPES = {"string": "STRING", "number": "DOUBLE", "integer": "BIGINT", "boolean": "BOOLEAN"}


@dataclass(frozen=True)
class Field:
    """One top-level field's rules, as plain data (what a SQL check needs, nothing JSON-Schema specific).

    ``type`` is the JSON type of a present value; ``nullable`` says whether JSON null is accepted too.
    ``exclusive_minimum`` is a bound the value must be strictly greater than (``amount > 0``).
    ``formats`` are JSON Schema formats of which the value must satisfy at least one; each format field also
    has a ``pattern`` that a SQL engine can check with ``RLIKE`` (patterns use Java/Python-common syntax).
    Numbers must also be finite (no NaN/Infinity), which JSON Schema cannot express.
    """

    name: str
    type: str
    required: bool
    nullable: bool = False
    enum: tuple | None = None
    const: Any = None
    minimum: float | None = None
    exclusive_minimum: float | None = None
    maximum: float | None = None
    exclusive_maximum: float | None = None
    min_length: int | None = None
    max_length: int | None = None
    pattern: str | None = None
    formats: tuple[str, ...] = ()
    description: str = ""

    @property
    def sql_type(self) -> str:
        return _SQL_TYPES[self.type]

    def as_dict(self) -> dict[str, Any]:
        """JSON-serializable rules; absent rules are left out."""
        out: dict[str, Any] = {"name": self.name, "type": self.type, "sql_type": self.sql_type,
                               "required": self.required, "nullable": self.nullable}
        for key in ("enum", "const", "minimum", "exclusive_minimum", "maximum", "exclusive_maximum",
                    "min_length", "max_length", "pattern"):
            value = getattr(self, key)
            if value is not None:
                out[key] = list(value) if isinstance(value, tuple) else value
        if self.formats:
            out["formats"] = list(self.formats)
        return out


def _types(prop: dict) -> list[str]:
    value = prop.get("type", [])
    return [value] if isinstance(value, str) else list(value)


def _field_from_schema(name: str, prop: dict, required: bool) -> Field:
    types = _types(prop)
    non_null = [t for t in types if t != "null"]
    if len(non_null) != 1:
        raise ValueError(f"field {name}: exactly one non-null type expected, got {types}")
    formats = [prop["format"]] if "format" in prop else []
    formats += [branch["format"] for branch in prop.get("anyOf", []) if "format" in branch]
    return Field(
        name=name,
        type=non_null[0],
        required=required,
        nullable="null" in types,
        enum=tuple(prop["enum"]) if "enum" in prop else None,
        const=prop.get("const"),
        minimum=prop.get("minimum"),
        exclusive_minimum=prop.get("exclusiveMinimum"),
        maximum=prop.get("maximum"),
        exclusive_maximum=prop.get("exclusiveMaximum"),
        min_length=prop.get("minLength"),
        max_length=prop.get("maxLength"),
        pattern=prop.get("pattern"),
        formats=tuple(formats),
        description=prop.get("description", ""),
    )


@dataclass(frozen=True)
class ValidationResult:
    """Violations make a record invalid; unknown fields do not (``ADDITIONAL_FIELDS_POLICY``)."""

    violations: list[str]
    unknown_fields: list[str]

    @property
    def ok(self) -> bool:
        return not self.violations


@dataclass(frozen=True, eq=False)
class Contract:
    """One version of one topic's contract."""

    topic: str
    version: int
    schema: dict
    fields: tuple[Field, ...]

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields if f.required)

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def field(self, name: str) -> Field:
        for item in self.fields:
            if item.name == name:
                return item
        raise KeyError(f"{self.topic} v{self.version} has no field {name!r}")

    def rules(self) -> list[dict[str, Any]]:
        """Every field's rules as JSON-serializable dicts (what a Spark job turns into SQL checks)."""
        return [f.as_dict() for f in self.fields]

    def spark_ddl(self) -> str:
        """A Spark DDL schema string for ``from_json`` (``"event_id STRING, amount DOUBLE, ..."``)."""
        return ", ".join(f"`{f.name}` {f.sql_type}" for f in self.fields)

    def unknown_fields(self, record: Any) -> list[str]:
        if not isinstance(record, dict):
            return []
        known = set(self.field_names)
        return [key for key in record if key not in known]

    def check(self, record: Any) -> ValidationResult:
        return ValidationResult(_violations(self, record), self.unknown_fields(record))

    @property
    def _validator(self) -> Draft202012Validator:
        return _validator_for(self.topic, self.version)


@cache
def _validator_for(topic: str, version: int) -> Draft202012Validator:
    return Draft202012Validator(_catalog()[topic][version], format_checker=_FORMATS)


@cache
def _contract(topic: str, version: int) -> Contract:
    schema = _catalog()[topic][version]
    required = set(schema.get("required", []))
    fields = tuple(_field_from_schema(name, prop, name in required) for name, prop in schema["properties"].items())
    return Contract(topic=topic, version=version, schema=schema, fields=fields)


def contract(topic: str, version: int | None = None) -> Contract:
    """The contract of ``topic`` (latest version unless ``version``)."""
    known = versions(topic)
    version = known[-1] if version is None else version
    if version not in known:
        raise KeyError(f"no version {version} of contract {topic!r}; known: {known}")
    return _contract(topic, version)


# -- validation ---------------------------------------------------------------------------------------------
def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _show(value: Any, limit: int = 60) -> str:
    """A short JSON rendering of a value for a message (never the whole 900 KiB memo)."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def _message(error, fields: dict[str, Field]) -> str:
    path = ".".join(str(p) for p in error.absolute_path)
    name = path.split(".")[0] if path else ""
    where = path or "record"
    value, rule = error.instance, error.validator_value
    kind = error.validator
    if kind == "type":
        wanted = " or ".join(rule) if isinstance(rule, list) else rule
        return f"{where}: expected {wanted}, got {_json_type(value)} {_show(value)}"
    if kind == "enum":
        return f"{where}: {_show(value)} is not one of {list(rule)}"
    if kind == "const":
        return f"{where}: {_show(value)} must be {_show(rule)}"
    if kind == "minimum":
        return f"{where}: {_show(value)} is less than the minimum {rule}"
    if kind == "exclusiveMinimum":
        return f"{where}: {_show(value)} is less than or equal to the minimum of {rule} (must be > {rule})"
    if kind == "maximum":
        return f"{where}: {_show(value)} is greater than the maximum {rule}"
    if kind == "exclusiveMaximum":
        return f"{where}: {_show(value)} is greater than or equal to the maximum of {rule} (must be < {rule})"
    if kind == "minLength":
        return f"{where}: length {len(value)} is shorter than minLength {rule}"
    if kind == "maxLength":
        return f"{where}: length {len(value)} exceeds maxLength {rule}"
    if kind == "pattern":
        return f"{where}: {_show(value)} does not match {rule}"
    if kind == "format":
        return f"{where}: {_show(value)} is not a valid {rule}"
    if kind == "anyOf" and name in fields and fields[name].formats:
        return f"{where}: {_show(value)} is not a valid {' or '.join(fields[name].formats)}"
    return f"{where}: {error.message[:200]}"


def _violations(spec: Contract, record: Any) -> list[str]:
    if not isinstance(record, dict):
        return [f"record: expected a JSON object, got {_json_type(record)} {_show(record)}"]
    fields = {f.name: f for f in spec.fields}
    out = [f"{name}: required field is missing" for name in spec.required if name not in record]
    for error in spec._validator.iter_errors(record):
        if error.validator == "required" and not error.absolute_path:
            continue  # reported above, one line per field
        out.append(_message(error, fields))
    for name, item in fields.items():
        value = record.get(name)
        if item.type == "number" and isinstance(value, float) and not math.isfinite(value):
            out.append(f"{name}: {_show(value)} is not a finite number")
    return out


def _pick_version(topic: str, record: Any) -> tuple[int, str | None]:
    known = versions(topic)
    declared = record.get("schema_version") if isinstance(record, dict) else None
    if isinstance(declared, int) and not isinstance(declared, bool) and declared not in known:
        return known[-1], f"schema_version: {declared} is not a known version of {topic!r} (known: {known})"
    if isinstance(declared, int) and not isinstance(declared, bool):
        return declared, None
    return known[-1], None  # missing or mistyped: the latest version's own rules report it


def validate(topic: str, record: Any, *, strict: bool = False) -> list[str]:
    """
    Violations of ``record`` (a decoded JSON value) against the contract version it declares.

    :param topic: ``transactions``, ``transaction-labels`` or ``case-notes``.
    :param record: the decoded message value.
    :param strict: also report unknown fields as violations (by default they are allowed; see
        :func:`unknown_fields`).
    :return: one human-readable line per problem, each starting with the field name; empty when valid.
    """
    version, unknown_version = _pick_version(topic, record)
    if unknown_version:
        return [unknown_version]
    spec = contract(topic, version)
    out = _violations(spec, record)
    if strict:
        out += [f"{name}: unknown field (not in {topic} v{version})" for name in spec.unknown_fields(record)]
    return out


def unknown_fields(topic: str, record: Any) -> list[str]:
    """Fields of ``record`` that its contract version does not declare (allowed, but worth counting)."""
    version, _ = _pick_version(topic, record)
    return contract(topic, version).unknown_fields(record)


def validate_message(topic: str, value: bytes | str | None) -> ValidationResult:
    """
    Check a raw Kafka message value: a tombstone (null value) and malformed JSON are violations too.

    :return: the violations and the unknown fields of the decoded record.
    """
    if value is None:
        return ValidationResult(["record: null value (tombstone) where a JSON object is expected"], [])
    try:
        record = json.loads(value)
    except (ValueError, UnicodeDecodeError) as exc:
        return ValidationResult([f"record: malformed JSON: {exc}"[:300]], [])
    version, unknown_version = _pick_version(topic, record)
    if unknown_version:
        return ValidationResult([unknown_version], [])
    return contract(topic, version).check(record)


# -- schema evolution ---------------------------------------------------------------------------------------
class IncompatibleSchemaError(NonRetryableError, ValueError):
    """A new schema version would break producers or consumers of the old one; ``problems`` names each field."""

    def __init__(self, topic: str, problems: list[str]):
        self.topic = topic
        self.problems = problems
        super().__init__(f"incompatible change to {topic!r}: " + "; ".join(problems))


def _accepts(new_types: Iterable[str], old_type: str) -> bool:
    new = set(new_types)
    return old_type in new or (old_type == "integer" and "number" in new)


def check_compatible(old_schema: dict, new_schema: dict) -> list[str]:
    """
    Check that ``new_schema`` can replace ``old_schema`` without breaking anyone.

    Allowed: adding an optional field, widening (a type, null accepted, an enum value added, a bound relaxed,
    a constraint dropped). Breaking, and refused: removing a field, making an optional field required, adding
    a required field, changing or narrowing a type, narrowing an enum, tightening a bound, length, pattern or
    const, forbidding unknown fields, or not increasing ``x-schema-version``.

    :return: the allowed changes, one line each (empty when nothing changed).
    :raises IncompatibleSchemaError: listing every breaking change, each naming its field.
    """
    topic = new_schema.get("x-topic") or new_schema.get("title") or "schema"
    problems: list[str] = []
    changes: list[str] = []
    old_version, new_version = old_schema.get("x-schema-version"), new_schema.get("x-schema-version")
    if isinstance(old_version, int) and isinstance(new_version, int) and new_version <= old_version:
        problems.append(f"x-schema-version: {new_version} must be greater than {old_version}")
    closed_before = old_schema.get("additionalProperties", True) is False
    if not closed_before and new_schema.get("additionalProperties", True) is False:
        problems.append("additionalProperties: unknown fields would now be refused")

    old_props, new_props = old_schema.get("properties", {}), new_schema.get("properties", {})
    old_required, new_required = set(old_schema.get("required", [])), set(new_schema.get("required", []))

    for name, old in old_props.items():
        if name not in new_props:
            problems.append(f"{name}: field removed")
            continue
        new = new_props[name]
        if name not in old_required and name in new_required:
            problems.append(f"{name}: optional field made required")
        old_types, new_types = _types(old), _types(new)
        lost = [t for t in old_types if not _accepts(new_types, t)]
        if lost:
            problems.append(f"{name}: type changed from {'|'.join(old_types)} to {'|'.join(new_types)}")
        elif set(new_types) != set(old_types):
            changes.append(f"{name}: type widened from {'|'.join(old_types)} to {'|'.join(new_types)}")
        if name == "schema_version":
            continue  # its const is the version number and changes with every version by design
        problems += _narrowing(name, old, new, changes)

    for name in new_props:
        if name in old_props:
            continue
        if name in new_required:
            problems.append(f"{name}: new field is required (old producers do not send it)")
        else:
            changes.append(f"{name}: optional field added")
    for name in sorted(new_required - set(new_props) - old_required):
        problems.append(f"{name}: required without a definition")

    if problems:
        raise IncompatibleSchemaError(topic, problems)
    return changes


def _narrowing(name: str, old: dict, new: dict, changes: list[str]) -> list[str]:
    problems = []
    if "enum" in new:
        if "enum" not in old:
            problems.append(f"{name}: enum {new['enum']} added where any value was allowed")
        else:
            removed = [v for v in old["enum"] if v not in new["enum"]]
            if removed:
                problems.append(f"{name}: enum narrowed, values {removed} removed")
            added = [v for v in new["enum"] if v not in old["enum"]]
            if added:
                changes.append(f"{name}: enum values {added} added")
    elif "enum" in old:
        changes.append(f"{name}: enum constraint dropped")
    if "const" in new and old.get("const") != new["const"]:
        problems.append(f"{name}: const changed from {old.get('const')!r} to {new['const']!r}")
    # A lower bound may only go down, an upper bound only up.
    for key, tighter in (("minimum", lambda o, n: n > o), ("exclusiveMinimum", lambda o, n: n > o),
                         ("minLength", lambda o, n: n > o), ("maximum", lambda o, n: n < o),
                         ("exclusiveMaximum", lambda o, n: n < o), ("maxLength", lambda o, n: n < o)):
        if key in new and key not in old:
            problems.append(f"{name}: {key} {new[key]} added")
        elif key in new and tighter(old[key], new[key]):
            problems.append(f"{name}: {key} tightened from {old[key]} to {new[key]}")
        elif key in old and (key not in new or old[key] != new[key]):
            changes.append(f"{name}: {key} relaxed from {old[key]} to {new.get(key, 'none')}")
    for key in ("pattern", "format"):
        if key in new and old.get(key) != new[key]:
            problems.append(f"{name}: {key} changed from {old.get(key)!r} to {new[key]!r}")
        elif key in old and key not in new:
            changes.append(f"{name}: {key} dropped")
    old_formats = [b.get("format") for b in old.get("anyOf", [])]
    new_formats = [b.get("format") for b in new.get("anyOf", [])]
    if new_formats and [f for f in old_formats if f not in new_formats] + ([] if old_formats else ["any"]):
        problems.append(f"{name}: accepted formats narrowed from {old_formats or 'any'} to {new_formats}")
    return problems
