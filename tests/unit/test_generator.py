"""The seeded event generator, without Kafka: determinism, hidden patterns, labels, notes and bad input."""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from datetime import datetime

import pytest

from decisionflow.contracts import CASE_NOTES, LABELS, TRANSACTIONS, validate_message
from decisionflow.risk import generator as gen
from decisionflow.risk.generator import (
    BAD_KINDS,
    DECOYS,
    PATTERNS,
    EventGenerator,
    GeneratorConfig,
    default_bootstrap_servers,
    generate,
    main,
)
from decisionflow.risk.producer import read_truth, summary_path_for


@pytest.fixture(scope="module")
def stream() -> list[gen.Message]:
    return list(generate(GeneratorConfig(events=6000, seed=42, bad_share=0.1)))


def digest(messages) -> str:
    h = hashlib.sha256()
    for m in messages:
        h.update(f"{m.topic}|{m.kind}|{m.key!r}|".encode())
        h.update(m.value if m.value is not None else b"<null>")
    return h.hexdigest()


def txn_time(message) -> str:
    return message.record_time


# -- determinism --------------------------------------------------------------------------------------------
def test_same_seed_same_bytes_different_seed_different_bytes():
    config = GeneratorConfig(events=1500, seed=7, bad_share=0.1)
    first, second = list(generate(config)), list(generate(config))
    assert digest(first) == digest(second)
    assert [m.truth() for m in first] == [m.truth() for m in second]
    assert digest(generate(config, seed=8)) != digest(first)
    again = EventGenerator(config)
    assert digest(again) == digest(again) == digest(first)  # re-iterating starts over from the seed


def test_same_bytes_across_processes_hash_seeds_and_time_zones():
    import os
    import subprocess
    import sys

    script = ("import hashlib; from decisionflow.risk.generator import generate; h = hashlib.sha256()\n"
              "for m in generate(events=600, seed=5, bad_share=0.2): h.update(m.kind.encode() + (m.value or b'-'))\n"
              "print(h.hexdigest())")
    digests = {
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": hash_seed, "TZ": tz}).stdout.strip()
        for hash_seed, tz in (("1", "UTC"), ("4242", "Asia/Tokyo"))
    }
    assert len(digests) == 1


def test_bad_share_does_not_change_which_transactions_happen():
    def events(bad_share):
        return sorted({m.event_id for m in generate(events=1500, seed=3, bad_share=bad_share)
                       if m.topic == TRANSACTIONS})

    assert events(0.0) == events(0.2)


def test_topic_selection_filters_without_changing_the_transactions():
    all_topics = [m for m in generate(events=800, seed=4) if m.topic == TRANSACTIONS]
    only = list(generate(events=800, seed=4, topics=(TRANSACTIONS,)))
    assert {m.topic for m in only} == {TRANSACTIONS}
    assert [m.value for m in only] == [m.value for m in all_topics]
    assert [m.seq for m in only] == list(range(len(only)))


def test_config_is_checked():
    for bad in ({"events": 0}, {"bad_share": 0.9}, {"topics": ("payments",)}, {"days": 0},
                {"bad_weights": {"gremlins": 1.0}}, {"start": datetime(2025, 1, 1)}):
        with pytest.raises(ValueError):
            GeneratorConfig(**bad)


# -- bad input ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("share", [0.0, 0.05, 0.2])
def test_share_of_bad_input_is_within_tolerance(share):
    messages = list(generate(events=12_000, seed=11, bad_share=share))
    observed = sum(m.kind != "valid" for m in messages) / len(messages)
    assert abs(observed - share) <= max(0.01, share * 0.15), observed


def test_every_bad_kind_is_present_on_every_topic_that_supports_it(stream):
    kinds = Counter((m.topic, m.kind) for m in stream)
    for kind in BAD_KINDS:
        assert kinds[(TRANSACTIONS, kind)] > 0, kind
    for kind in ("malformed_json", "schema_violation", "tombstone", "unknown_fields", "duplicate"):
        assert kinds[(LABELS, kind)] > 0 and kinds[(CASE_NOTES, kind)] > 0, kind
    assert kinds[(LABELS, "oversized")] == 0
    assert kinds[(LABELS, "late")] == kinds[(LABELS, "out_of_order")] == 0


def test_valid_records_pass_the_contract_and_invalid_ones_fail_on_the_named_field(stream):
    for m in stream:
        result = validate_message(m.topic, m.value)
        assert result.ok == m.contract_valid, (m.kind, m.violation, result.violations)
        if m.kind in ("schema_violation", "oversized"):
            assert any(v.startswith(f"{m.violation}:") for v in result.violations), (m.violation, result.violations)
        elif m.kind == "malformed_json":
            assert m.violation == "json" and result.violations[0].startswith("record: malformed JSON")
        elif m.kind == "tombstone":
            assert m.value is None and m.violation == "null" and m.key is not None
        elif m.kind == "unknown_fields":
            assert result.unknown_fields
        else:
            assert m.contract_valid and not result.unknown_fields, m.kind


def test_oversized_messages_are_large_but_below_the_broker_limit(stream):
    sizes = [len(m.value) for m in stream if m.kind == "oversized"]
    assert sizes and all(200 * 1024 <= s < 1_000_000 for s in sizes)
    capped = [m for m in generate(events=3000, seed=1, bad_share=0.5, oversized_cap=3) if m.kind == "oversized"]
    assert len(capped) == 3


def test_duplicates_are_exact_resends_of_an_earlier_message(stream):
    by_seq = {m.seq: m for m in stream}
    duplicates = [m for m in stream if m.kind == "duplicate"]
    assert duplicates
    for dup in duplicates:
        original = by_seq[dup.duplicate_of]
        assert original.seq < dup.seq and original.kind == "valid"
        assert (original.topic, original.key, original.value) == (dup.topic, dup.key, dup.value)
        assert original.event_id == dup.event_id


def test_late_and_out_of_order_transactions_really_arrive_out_of_order(stream):
    latest = ""
    seen = Counter()
    for m in stream:
        if m.topic != TRANSACTIONS or m.kind in ("malformed_json", "tombstone"):
            continue
        if m.kind in ("late", "out_of_order"):
            assert m.record_time < latest, (m.kind, m.record_time, latest)
            seen[m.kind] += 1
            if m.kind == "late":
                sent = datetime.fromisoformat(m.sent_at.replace("Z", "+00:00"))
                happened = datetime.fromisoformat(m.record_time.replace("Z", "+00:00"))
                assert (sent - happened).total_seconds() >= 2 * 3600
        elif m.kind != "duplicate":
            assert m.record_time >= latest  # everything else arrives in event-time order
        latest = max(latest, m.record_time)
    assert seen["late"] > 0 and seen["out_of_order"] > 0


# -- hidden patterns ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_pattern_and_decoy_is_present_at_reasonable_n(seed):
    txns = [m for m in generate(events=5000, seed=seed, bad_share=0.0) if m.topic == TRANSACTIONS]
    assert len(txns) == 5000
    patterns = Counter(m.pattern for m in txns if m.is_fraud)
    assert set(patterns) == set(PATTERNS), patterns
    assert all(not m.pattern for m in txns if not m.is_fraud)
    assert set(m.decoy for m in txns if m.decoy) == set(DECOYS)
    share = sum(m.is_fraud for m in txns) / len(txns)
    assert 0.01 < share < 0.1, share


def test_patterns_show_in_the_data(stream):
    txns = [json.loads(m.value) | {"_m": m} for m in stream if m.topic == TRANSACTIONS and m.kind == "valid"]
    by_pattern = {p: [t for t in txns if t["_m"].pattern == p] for p in PATTERNS}
    legit = [t for t in txns if not t["_m"].is_fraud]
    # velocity bursts: the same account pays again within two minutes
    burst_accounts = Counter(t["account_id"] for t in by_pattern["velocity_burst"])
    assert max(burst_accounts.values()) >= 4
    # account takeover and bursts come from the attackers' shared devices
    attacker = {t["device_id"] for t in by_pattern["account_takeover"] + by_pattern["velocity_burst"]}
    legit_devices = {t["device_id"] for t in legit}
    assert not attacker & legit_devices
    assert all(t["channel"] == "mobile" for t in by_pattern["account_takeover"])
    # country mismatch happens in person, abroad
    assert all(t["channel"] in ("card_present", "atm") and t["device_id"] is None
               for t in by_pattern["country_mismatch"])
    # new device + high amount: far above the median legit amount in USD-like currencies
    high = [t["amount"] for t in by_pattern["new_device_high_amount"] if t["currency"] in ("USD", "EUR", "GBP")]
    usual = sorted(t["amount"] for t in legit if t["currency"] in ("USD", "EUR", "GBP"))
    assert sorted(high)[len(high) // 2] > 5 * usual[len(usual) // 2]


# -- labels and case notes ----------------------------------------------------------------------------------
def test_labels_only_for_transactions_that_were_delivered_and_after_them(stream):
    delivered = {}
    for m in stream:
        if m.topic == TRANSACTIONS and m.contract_valid and m.kind != "duplicate":
            delivered[m.event_id] = m
    labels = [m for m in stream if m.topic == LABELS and m.contract_valid]
    assert len(labels) > 200
    for m in labels:
        label = json.loads(m.value)
        txn = delivered[label["event_id"]]  # KeyError = a label for a transaction nobody received
        assert txn.seq < m.seq
        assert m.key == txn.key
        assert (label["label"] == "fraud") == txn.is_fraud and m.pattern == txn.pattern
        assert label["labelled_at"] > txn.record_time
        delay_h = (datetime.fromisoformat(label["labelled_at"].replace("Z", "+00:00"))
                   - datetime.fromisoformat(txn.record_time.replace("Z", "+00:00"))).total_seconds() / 3600
        if label["source"] == "chargeback":
            assert label["label"] == "fraud" and delay_h >= 48
        else:
            assert 1 <= delay_h <= 72 + 36  # hours after arrival (a late transaction arrives up to 36 h late)
    sources = Counter(json.loads(m.value)["source"] for m in labels)
    assert sources["chargeback"] > 0 and sources["investigation"] > 0
    fraud_delivered = sum(t.is_fraud for t in delivered.values())
    fraud_labelled = len({json.loads(m.value)["event_id"] for m in labels if m.is_fraud})
    assert 0.7 * fraud_delivered < fraud_labelled <= fraud_delivered


KEYWORDS = {
    "velocity_burst": ("min", "burst"),
    "account_takeover": ("one-time code", "password", "safe account"),
    "new_device_high_amount": ("device",),
    "country_mismatch": ("cloned", "impossible travel"),
    "risky_merchant": ("watch list", "merchant"),
}


def test_case_notes_are_written_for_investigated_transactions_and_match_the_pattern(stream):
    investigated = {json.loads(m.value)["event_id"] for m in stream
                    if m.topic == LABELS and m.kind in ("valid", "unknown_fields", "duplicate")
                    and json.loads(m.value)["source"] == "investigation"}
    txn_ids = {m.event_id for m in stream if m.topic == TRANSACTIONS and m.contract_valid}
    cases: dict[str, list[dict]] = {}
    for m in stream:
        if m.topic == CASE_NOTES and m.contract_valid:
            note = json.loads(m.value)
            assert note["event_id"] in txn_ids and note["account_id"].encode() == m.key
            cases.setdefault(note["case_id"], []).append(note | {"_m": m})
    assert len(cases) > 100
    notes_for = {notes[0]["event_id"] for notes in cases.values()}
    assert len(notes_for & investigated) > 0.9 * len(investigated)
    lost = {m.event_id for m in stream if m.topic == CASE_NOTES and not m.contract_valid}
    for notes in cases.values():
        assert len({n["event_id"] for n in notes}) == 1
        if notes[0]["event_id"] in lost:
            continue  # one of its notes was replaced by bad input: the conclusion may be the missing one
        assert [n["created_at"] for n in notes] == sorted(n["created_at"] for n in notes)
        m = notes[-1]["_m"]
        text = " ".join(n["text"] for n in notes).lower()
        if m.is_fraud:
            assert any(k in text for k in KEYWORDS[m.pattern]), (m.pattern, text)
        else:
            assert "legitimate" in text or "not fraud" in text or "no fraud" in text or "no further" in text, text


def test_messages_are_keyed_by_account(stream):
    for m in stream:
        assert m.key is not None and m.key.startswith(b"acc-")
        if m.topic == TRANSACTIONS and m.contract_valid:
            assert json.loads(m.value)["account_id"].encode() == m.key


# -- command line (dry run: no Kafka) -----------------------------------------------------------------------
def test_main_dry_run_writes_truth_in_produce_order(tmp_path):
    truth = tmp_path / "truth.jsonl"
    argv = ["produce", "--events", "400", "--seed", "9", "--bad-share", "0.1", "--truth", str(truth), "--dry-run",
            "--no-progress"]
    assert main(argv) == 0
    rows = read_truth(truth)
    assert [r["seq"] for r in rows] == list(range(len(rows)))
    expected = [m.truth() for m in generate(events=400, seed=9, bad_share=0.1)]
    assert [{k: r[k] for k in expected[0]} for r in rows] == expected
    assert all(r["partition"] is None and r["offset"] is None and r["error"] is None for r in rows)
    assert all((r["value_sha256"] is None) == (r["kind"] == "tombstone") for r in rows)
    summary = json.loads(summary_path_for(truth).read_text())
    assert summary["produced"] == len(rows) and summary["config"]["seed"] == 9
    assert summary["transactions"] == 400 and sum(summary["by_topic"].values()) == len(rows)


def test_rate_limits_messages_per_second(tmp_path):
    started = time.monotonic()
    argv = ["produce", "--events", "100", "--seed", "1", "--rate", "400", "--truth", str(tmp_path / "t.jsonl"),
            "--dry-run", "--no-progress", "--topics", "transactions"]
    assert main(argv) == 0
    produced = len(read_truth(tmp_path / "t.jsonl"))
    assert time.monotonic() - started >= (produced - 1) / 400 * 0.95


def test_usage_errors_return_a_code():
    assert main(["produce", "--bad-share", "2", "--dry-run"]) == 2
    assert main(["produce", "--topics", "payments"]) == 2
    assert main(["produce", "--rate", "-1", "--dry-run"]) == 2
    assert main(["--events", "0", "--dry-run"]) == 2  # the subcommand word is optional
    assert main(["produce", "--help"]) == 0


def test_default_bootstrap_from_the_airflow_connection_or_the_local_stack(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_KAFKA_DEFAULT", json.dumps(
        {"conn_type": "kafka", "extra": {"bootstrap.servers": "127.0.0.1:29092", "group.id": "x"}}))
    assert default_bootstrap_servers() == ("127.0.0.1:29092", "env AIRFLOW_CONN_KAFKA_DEFAULT")
    monkeypatch.setenv("AIRFLOW_CONN_KAFKA_DEFAULT",
                       "kafka://?__extra__=%7B%22bootstrap.servers%22%3A+%22127.0.0.1%3A39092%22%7D")
    assert default_bootstrap_servers()[0] == "127.0.0.1:39092"
    monkeypatch.delenv("AIRFLOW_CONN_KAFKA_DEFAULT")
    monkeypatch.delenv("AIRFLOW_HOME", raising=False)
    monkeypatch.setenv("DECISIONFLOW_KAFKA_PORT", "19092")
    assert default_bootstrap_servers() == ("127.0.0.1:19092", "local stack default")


def test_pure_generation_throughput(capsys):
    config = GeneratorConfig(events=20_000, seed=0)
    started = time.perf_counter()
    count = sum(1 for _ in EventGenerator(config))
    elapsed = time.perf_counter() - started
    with capsys.disabled():
        print(f"\n[generator] {count} messages in {elapsed:.2f}s = {count / elapsed:,.0f} msg/s")
    assert count / elapsed > 1000
