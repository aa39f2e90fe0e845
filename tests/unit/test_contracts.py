"""Event contracts: the schema files, validation messages, machine-readable rules and schema evolution."""

from __future__ import annotations

import copy
import json
import re

import pytest
from jsonschema import Draft202012Validator

from decisionflow import contracts
from decisionflow.contracts import (
    CASE_NOTES,
    LABELS,
    SOURCE_TOPICS,
    TOPICS,
    TRANSACTIONS,
    IncompatibleSchemaError,
    check_compatible,
    contract,
    load_schema,
    unknown_fields,
    validate,
    validate_message,
)

TXN = {
    "event_id": "7f1c0c62-3b1e-4c8e-9a51-0d7f1f7d1f00",
    "event_time": "2025-01-06T10:00:00.123Z",
    "account_id": "acc-000001",
    "merchant_id": "mer-00042",
    "amount": 12.5,
    "currency": "EUR",
    "mcc": "5411",
    "channel": "ecommerce",
    "country": "DE",
    "device_id": "dev-0011223344556677",
    "ip": "203.0.113.7",
    "memo": "weekly shop",
    "schema_version": 1,
}
LABEL = {"event_id": TXN["event_id"], "label": "fraud", "source": "chargeback",
         "labelled_at": "2025-01-20T08:00:00Z", "schema_version": 1}
NOTE = {"case_id": "CASE-0000001", "event_id": TXN["event_id"], "account_id": "acc-000001",
        "author": "inv.a.durand", "text": "Customer confirmed the purchase.", "created_at": "2025-01-07T09:30:00Z",
        "schema_version": 1}
SAMPLES = {TRANSACTIONS: TXN, LABELS: LABEL, CASE_NOTES: NOTE}


def with_(record: dict, **changes) -> dict:
    out = dict(record)
    for key, value in changes.items():
        if value is ...:
            out.pop(key)
        else:
            out[key] = value
    return out


# -- the registry -------------------------------------------------------------------------------------------
def test_every_topic_has_a_valid_versioned_draft_2020_12_schema():
    for topic in SOURCE_TOPICS:
        assert contracts.versions(topic) == [1]
        schema = load_schema(topic)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        Draft202012Validator.check_schema(schema)
        assert schema["x-topic"] == topic and schema["x-schema-version"] == 1
        assert schema["properties"]["schema_version"] == {**schema["properties"]["schema_version"], "const": 1}
        assert contract(topic).version == 1
    with pytest.raises(KeyError, match="no contract for topic 'nope'"):
        contract("nope")
    with pytest.raises(KeyError, match="no version 9"):
        contract(TRANSACTIONS, 9)


def test_load_schema_returns_a_copy():
    schema = load_schema(TRANSACTIONS)
    schema["properties"].clear()
    assert load_schema(TRANSACTIONS)["properties"]


def test_topics_defaults_live_in_one_place_with_dead_letter_topics():
    assert set(TOPICS) == {*SOURCE_TOPICS, *(f"{t}.dlq" for t in SOURCE_TOPICS)}
    for name, spec in TOPICS.items():
        assert spec.name == name and spec.partitions == 3 and spec.retention_ms > 0
        assert spec.topic_config()["retention.ms"] == str(spec.retention_ms)
        assert spec.topic_config()["cleanup.policy"] == "delete"
        assert spec.dlq == name.endswith(".dlq")
        assert spec.contract == (None if spec.dlq else name)
    assert TOPICS[TRANSACTIONS].retention_ms == 7 * 24 * 3600 * 1000
    assert contracts.dlq_topic("case-notes") == "case-notes.dlq"
    with pytest.raises(ValueError):
        contracts.dlq_topic("case-notes.dlq")


def test_the_decision_on_unknown_fields_is_explicit():
    assert contracts.ADDITIONAL_FIELDS_POLICY == "allow"
    for topic in SOURCE_TOPICS:
        assert load_schema(topic)["additionalProperties"] is True


# -- validation ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("topic", SOURCE_TOPICS)
def test_a_valid_record_has_no_violations(topic):
    assert validate(topic, SAMPLES[topic]) == []
    assert validate_message(topic, json.dumps(SAMPLES[topic]).encode()).ok


def test_optional_fields_may_be_null_or_absent():
    assert validate(TRANSACTIONS, with_(TXN, device_id=None, ip=None, memo=None)) == []
    assert validate(TRANSACTIONS, with_(TXN, device_id=..., ip=..., memo=...)) == []
    assert validate(TRANSACTIONS, with_(TXN, ip="2001:db8::1", amount=1_000_000, currency="JPY")) == []


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"amount": -3}, "amount: -3 is less than or equal to the minimum of 0 (must be > 0)"),
        ({"amount": 0}, "amount: 0 is less than or equal to the minimum of 0 (must be > 0)"),
        ({"amount": 1_000_000.01}, "amount: 1000000.01 is greater than the maximum 1000000"),
        ({"amount": "12.50"}, 'amount: expected number, got string "12.50"'),
        ({"amount": None}, "amount: expected number, got null null"),
        ({"amount": True}, "amount: expected number, got boolean true"),
        ({"amount": float("nan")}, "amount: NaN is not a finite number"),
        ({"amount": ...}, "amount: required field is missing"),
        ({"currency": "eur"}, 'currency: "eur" does not match ^[A-Z]{3}$'),
        ({"mcc": 5411}, "mcc: expected string, got integer 5411"),
        ({"mcc": "541"}, 'mcc: "541" does not match ^[0-9]{4}$'),
        ({"channel": "pos"}, "channel: \"pos\" is not one of ['card_present', 'ecommerce', 'mobile', 'atm']"),
        ({"country": "DEU"}, 'country: "DEU" does not match ^[A-Z]{2}$'),
        ({"event_id": "abc"}, "event_id: \"abc\" is not a valid uuid"),
        ({"event_time": "2025-02-30T10:00:00Z"}, 'event_time: "2025-02-30T10:00:00Z" is not a valid date-time'),
        ({"event_time": "2025-01-06T10:00:00+01:00"}, "event_time: \"2025-01-06T10:00:00+01:00\" does not match"),
        ({"ip": "999.1.1.1"}, 'ip: "999.1.1.1" is not a valid ipv4 or ipv6'),
        ({"device_id": ""}, "device_id: length 0 is shorter than minLength 1"),
        ({"memo": "x" * 600}, "memo: length 600 exceeds maxLength 500"),
        ({"schema_version": 2}, "schema_version: 2 is not a known version of 'transactions' (known: [1])"),
        ({"schema_version": "1"}, 'schema_version: expected integer, got string "1"'),
    ],
)
def test_violations_name_the_field(changes, expected):
    violations = validate(TRANSACTIONS, with_(TXN, **changes))
    assert violations, changes
    assert any(v.startswith(expected) for v in violations), violations
    field = next(iter(changes))
    assert all(v.startswith(f"{field}:") for v in violations), violations


def test_every_problem_is_reported_once_per_field():
    record = with_(TXN, amount=-1, currency="x", channel="web", mcc=..., account_id=...)
    fields = sorted(v.split(":")[0] for v in validate(TRANSACTIONS, record))
    assert fields == ["account_id", "amount", "channel", "currency", "mcc"]


def test_messages_stay_short_for_huge_values():
    (violation,) = validate(CASE_NOTES, with_(NOTE, text="y" * 900_000))
    assert violation == "text: length 900000 exceeds maxLength 10000"
    (violation,) = validate(TRANSACTIONS, with_(TXN, merchant_id="!" * 50))
    assert len(violation) < 150


def test_labels_and_case_notes_rules():
    assert validate(LABELS, with_(LABEL, label="maybe")) == [
        "label: \"maybe\" is not one of ['fraud', 'legit']"]
    assert validate(LABELS, with_(LABEL, source="model"))[0].startswith("source: ")
    assert validate(LABELS, with_(LABEL, labelled_at="2025-01-20"))[0].startswith("labelled_at: ")
    assert validate(CASE_NOTES, with_(NOTE, text=""))[0] == "text: length 0 is shorter than minLength 1"
    assert validate(CASE_NOTES, with_(NOTE, author=...)) == ["author: required field is missing"]


def test_a_record_that_is_not_an_object():
    assert validate(TRANSACTIONS, [1, 2]) == ["record: expected a JSON object, got array [1, 2]"]
    assert validate(TRANSACTIONS, None) == ["record: expected a JSON object, got null null"]


def test_raw_messages_tombstones_and_malformed_json():
    assert validate_message(TRANSACTIONS, None).violations == [
        "record: null value (tombstone) where a JSON object is expected"]
    (violation,) = validate_message(TRANSACTIONS, b'{"event_id": "x",').violations
    assert violation.startswith("record: malformed JSON: ")
    (violation,) = validate_message(TRANSACTIONS, b"\xc3\x28{}").violations
    assert violation.startswith("record: malformed JSON: ")


def test_unknown_fields_are_allowed_but_reported():
    record = with_(TXN, loyalty_tier="gold", geo={"lat": 1.0})
    assert validate(TRANSACTIONS, record) == []
    assert unknown_fields(TRANSACTIONS, record) == ["loyalty_tier", "geo"]
    result = validate_message(TRANSACTIONS, json.dumps(record))
    assert result.ok and result.unknown_fields == ["loyalty_tier", "geo"]
    assert validate(TRANSACTIONS, record, strict=True) == [
        "loyalty_tier: unknown field (not in transactions v1)", "geo: unknown field (not in transactions v1)"]
    assert unknown_fields(TRANSACTIONS, TXN) == []


# -- machine-readable rules ---------------------------------------------------------------------------------
def test_fields_expose_every_rule_as_plain_data():
    spec = contract(TRANSACTIONS)
    assert spec.field_names == tuple(TXN)
    assert spec.required == ("event_id", "event_time", "account_id", "merchant_id", "amount", "currency", "mcc",
                             "channel", "country", "schema_version")
    amount = spec.field("amount")
    assert (amount.type, amount.required, amount.nullable) == ("number", True, False)
    assert (amount.exclusive_minimum, amount.maximum, amount.sql_type) == (0, 1_000_000, "DOUBLE")
    assert spec.field("channel").enum == ("card_present", "ecommerce", "mobile", "atm")
    assert spec.field("memo").nullable and not spec.field("memo").required and spec.field("memo").max_length == 500
    assert spec.field("ip").formats == ("ipv4", "ipv6")
    assert spec.field("event_id").formats == ("uuid",)
    assert spec.field("schema_version").const == 1
    for f in spec.fields:  # every format has a SQL-checkable pattern next to it
        assert not f.formats or f.pattern
    rules = json.loads(json.dumps(spec.rules()))
    assert rules[4] == {"name": "amount", "type": "number", "sql_type": "DOUBLE", "required": True,
                        "nullable": False, "exclusive_minimum": 0, "maximum": 1000000}
    assert spec.spark_ddl().startswith("`event_id` STRING, `event_time` STRING,")
    assert "`amount` DOUBLE" in spec.spark_ddl() and "`schema_version` BIGINT" in spec.spark_ddl()


def _check_with_rules(rules: list[dict], record: dict) -> bool:
    """What a SQL engine can check from ``Contract.rules()`` alone (no JSON Schema): formats aside."""
    kinds = {"string": str, "number": (int, float), "integer": int}
    for rule in rules:
        name = rule["name"]
        if name not in record or record[name] is None:
            if rule["required"] or (name in record and not rule["nullable"]):
                return False
            continue
        value = record[name]
        if isinstance(value, bool) or not isinstance(value, kinds[rule["type"]]):
            return False
        if "enum" in rule and value not in rule["enum"]:
            return False
        if "const" in rule and value != rule["const"]:
            return False
        if "exclusive_minimum" in rule and not value > rule["exclusive_minimum"]:
            return False
        if "minimum" in rule and not value >= rule["minimum"]:
            return False
        if "maximum" in rule and not value <= rule["maximum"]:
            return False
        if "min_length" in rule and len(value) < rule["min_length"]:
            return False
        if "max_length" in rule and len(value) > rule["max_length"]:
            return False
        if "pattern" in rule and not re.search(rule["pattern"], value):
            return False
    return True


def test_rules_alone_reproduce_the_contract_except_formats():
    from decisionflow.risk.generator import GeneratorConfig, generate

    checked = 0
    for message in generate(GeneratorConfig(events=3000, seed=5, bad_share=0.3)):
        if message.kind in ("malformed_json", "tombstone"):
            continue
        record = json.loads(message.value)
        if record.get("schema_version") not in (1, None) and isinstance(record.get("schema_version"), int):
            continue  # unknown versions are refused before any field rule
        violations = validate(message.topic, record)
        by_rules = _check_with_rules(contract(message.topic).rules(), record)
        format_only = violations and all("is not a valid" in v for v in violations)
        assert by_rules == (not violations) or (by_rules and format_only), (violations, record)
        checked += 1
    assert checked > 3000


# -- schema evolution ---------------------------------------------------------------------------------------
def _next(schema: dict) -> dict:
    new = copy.deepcopy(schema)
    version = new["x-schema-version"] + 1
    new["x-schema-version"] = version
    new["properties"]["schema_version"]["const"] = version
    return new


def test_adding_an_optional_field_is_compatible():
    old = load_schema(TRANSACTIONS)
    new = _next(old)
    new["properties"]["loyalty_tier"] = {"type": ["string", "null"], "enum": ["bronze", "silver", "gold", None]}
    new["properties"]["channel"]["enum"].append("wallet")
    new["properties"]["memo"]["maxLength"] = 1000
    changes = check_compatible(old, new)
    assert "loyalty_tier: optional field added" in changes
    assert "channel: enum values ['wallet'] added" in changes
    assert "memo: maxLength relaxed from 500 to 1000" in changes
    assert check_compatible(old, _next(old)) == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: (s["properties"].pop("memo"), s["required"]), "memo: field removed"),
        (lambda s: s["required"].append("device_id"), "device_id: optional field made required"),
        (lambda s: s["properties"]["amount"].update(type="string"), "amount: type changed from number to string"),
        (lambda s: s["properties"]["mcc"].update(type="integer"), "mcc: type changed from string to integer"),
        (lambda s: s["properties"]["memo"].update(type="string"), "memo: type changed from string|null to string"),
        (lambda s: s["properties"]["channel"]["enum"].remove("atm"), "channel: enum narrowed, values ['atm'] removed"),
        (lambda s: (s["properties"].update(risk={"type": "number"}), s["required"].append("risk")),
         "risk: new field is required"),
        (lambda s: s["properties"]["memo"].update(maxLength=100), "memo: maxLength tightened from 500 to 100"),
        (lambda s: s["properties"]["amount"].update(maximum=10_000), "amount: maximum tightened from 1000000 to 10000"),
        (lambda s: s["properties"]["currency"].update(pattern="^(EUR|USD)$"), "currency: pattern changed"),
        (lambda s: s["properties"]["country"].update(enum=["DE", "FR"]), "country: enum ['DE', 'FR'] added"),
        (lambda s: s.update(additionalProperties=False), "additionalProperties: unknown fields would now be refused"),
    ],
)
def test_breaking_changes_are_refused_naming_the_field(change, message):
    old = load_schema(TRANSACTIONS)
    new = _next(old)
    change(new)
    with pytest.raises(IncompatibleSchemaError) as caught:
        check_compatible(old, new)
    assert any(p.startswith(message) for p in caught.value.problems), caught.value.problems
    assert message.split(":")[0] in str(caught.value)
    assert str(caught.value).startswith("incompatible change to 'transactions': ")


def test_widening_a_type_is_compatible_and_the_version_must_increase():
    old = load_schema(LABELS)
    new = _next(old)
    new["properties"]["schema_version"]["type"] = "number"  # integer -> number accepts every old value
    assert check_compatible(old, new) == ["schema_version: type widened from integer to number"]
    with pytest.raises(IncompatibleSchemaError, match="x-schema-version: 1 must be greater than 1"):
        check_compatible(old, copy.deepcopy(old))


def test_registered_versions_are_compatible_in_sequence():
    for topic in SOURCE_TOPICS:
        known = contracts.versions(topic)
        for before, after in zip(known, known[1:]):
            check_compatible(load_schema(topic, before), load_schema(topic, after))
