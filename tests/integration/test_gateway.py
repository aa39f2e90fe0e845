"""The gateway under real uvicorn (``python -m decisionflow_serving``) with a real MLflow model version, a real
Feast online store (SQLite) over gold Delta tables, and a real Kafka broker.

Gold is the seeded synthetic gold (``make_enriched_transactions``) written as the declared Delta tables (no
Spark): ``gold/account_features`` and ``gold/merchant_features`` are applied and materialized with the project's
feature repo. A LightGBM model (risk_v1 features + the on-demand ones) is logged and registered in a private
MLflow server; the gateway serves that version.

Shows: 401 without a token; a schemathesis fuzz of ``/openapi.json`` finds no server error; online/batch
parity -- for the gold transactions whose rows are the latest materialized ones of their account and merchant,
the online feature vector equals the training vector (Feast's point-in-time historical retrieval, as the
training set is built) and ``/v1/decisions?dry_run=true`` returns the decision a real batch decision run
(``run_decisions`` with the same MLflow version) makes for them; a published decision reaches the ``decisions``
topic with key decision_id and header origin=online; freshness and missing entities are reported.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import urllib.request
from datetime import timedelta
from pathlib import Path

import pandas as pd
import pytest

try:
    from .fixtures_feast import applied_feast_hook
    from .fixtures_kafka import ensure_topic, kafka_broker  # noqa: F401 - pytest fixture
    from .fixtures_ml import free_port, http_status, mlflow_server, stop_group, wait_until  # noqa: F401
except ImportError:  # collected as a plain directory (rootdir-relative import mode)
    from fixtures_feast import applied_feast_hook
    from fixtures_kafka import ensure_topic, kafka_broker  # noqa: F401
    from fixtures_ml import free_port, http_status, mlflow_server, stop_group, wait_until  # noqa: F401

from decisionflow import constants
from decisionflow.lakehouse import tables
from decisionflow.models.synthetic import make_enriched_transactions

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

N, SEED = 1500, 23
SERVICE = "risk_v1"
TOPIC = "gateway-test-decisions"
TRANSACTION_FIELDS = ("event_id", "event_time", "account_id", "merchant_id", "amount", "currency", "mcc", "channel",
                      "country", "device_id", "ip", "memo")


def _arrow_schema(name: str):
    import pyarrow as pa

    types = {"string": pa.string(), "bigint": pa.int64(), "int": pa.int32(), "double": pa.float64(),
             "timestamp": pa.timestamp("us", tz="UTC"), "boolean": pa.bool_()}
    return pa.schema([pa.field(c.name, types[tables.normalize_type(c.type)], nullable=c.nullable)
                      for c in tables.table(name).columns])


def write_table(lake: str, name: str, frame: pd.DataFrame) -> None:
    """``frame``'s columns of the declared table ``name``, typed as declared, as a new Delta table."""
    import pyarrow as pa
    from deltalake import write_deltalake

    schema = _arrow_schema(name)
    data = {}
    for field in schema:
        column = frame[field.name] if field.name in frame.columns else pd.Series([None] * len(frame))
        if pa.types.is_integer(field.type):
            column = column.round().astype("Int64")
        data[field.name] = pa.array(column.tolist(), type=field.type, from_pandas=True)
    write_deltalake(tables.table_path(lake, name), pa.table(data, schema=schema), mode="error")


def to_transaction(row: pd.Series) -> dict:
    """A gold row as the transactions-contract record a client would send."""
    record = {name: row[name] for name in TRANSACTION_FIELDS}
    record["event_time"] = row["event_time"].strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    record["amount"] = float(row["amount"])
    record["schema_version"] = 1
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()}


# -- fixtures ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gold() -> pd.DataFrame:
    return synthetic_gold()


def synthetic_gold() -> pd.DataFrame:
    frame = make_enriched_transactions(N, seed=SEED, accounts=300, merchants=40)
    frame["event_time"] = frame["event_time"].dt.floor("us")  # Delta keeps microseconds
    frame["updated_at"] = frame["event_time"]
    return frame


@pytest.fixture(scope="module")
def feature_store(gold, tmp_path_factory):
    """The project's feature repo applied over gold, both views materialized into SQLite: (store, folder)."""
    root = tmp_path_factory.mktemp("gateway")
    lake = str(root / "lake")
    write_table(lake, "gold/account_features", gold)
    write_table(lake, "gold/merchant_features", gold)
    folder = root / "feast"
    with applied_feast_hook(lake, folder) as hook:
        store = hook.get_store()
        start, end = gold["event_time"].min(), gold["event_time"].max()
        store.materialize((start - timedelta(days=1)).to_pydatetime(), (end + timedelta(seconds=1)).to_pydatetime(),
                          feature_views=["account_features", "merchant_features"])
        yield store, folder


@pytest.fixture(scope="module")
def model_version(mlflow_server):  # noqa: F811 - fixture injection
    """A LightGBM on risk_v1 + the on-demand features, logged and registered: its version."""
    from decisionflow.features.transforms import TRANSACTION_CONTEXT_OUTPUTS, add_on_demand_features
    from decisionflow.models.config import DEFAULT_FEATURE_COLUMNS, LightGBMParams, TrainingConfig
    from decisionflow.models.pipeline import train_and_evaluate
    from decisionflow.models.registry import register_challenger
    from decisionflow.models.synthetic import make_transactions
    from decisionflow.models.tracking import FEATURE_SERVICE_TAG, log_training_run, mlflow_client

    columns = [*DEFAULT_FEATURE_COLUMNS, *TRANSACTION_CONTEXT_OUTPUTS]
    config = TrainingConfig(lightgbm=LightGBMParams(n_estimators=60))
    outcome = train_and_evaluate(add_on_demand_features(make_transactions(4000, seed=11)), columns, config)
    client = mlflow_client(mlflow_server.url)
    run_id = log_training_run(client, "gateway-test", outcome, run_name="gateway",
                              tags={FEATURE_SERVICE_TAG: SERVICE})
    return register_challenger(client, constants.MODEL_NAME, run_id).version


@pytest.fixture(scope="module")
def gateway(mlflow_server, model_version, feature_store, kafka_broker, tmp_path_factory):  # noqa: F811
    """``python -m decisionflow_serving`` on a free port: (base url, token, settings dict)."""
    from decisionflow_serving.auth import ensure_first_token

    _, folder = feature_store
    root = tmp_path_factory.mktemp("gateway-run")
    token = ensure_first_token(root).read_text().strip()
    ensure_topic(kafka_broker.bootstrap_servers, TOPIC, partitions=1)
    port = free_port()
    settings = {
        "mlflow_uri": mlflow_server.url, "model_version": str(model_version),
        "feast_registry": str(folder / "registry.db"),
        "feast_online_store": json.dumps({"type": "sqlite", "path": str(folder / "online.db")}),
        "token_store": str(root / "serving" / "api_tokens.json"),
        "kafka_bootstrap": kafka_broker.bootstrap_servers, "decisions_topic": TOPIC,
    }
    argv = [sys.executable, "-m", "decisionflow_serving", "--port", str(port), "--log-level", "warning"]
    for name, value in settings.items():
        argv += ["--" + name.replace("_", "-"), value]
    log = root / "gateway.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                   cwd=root, env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.url})
    url = f"http://127.0.0.1:{port}"
    try:
        error = wait_until(lambda: http_status(f"{url}/ready") == 200, 180, process, log, "gateway")
        if error:
            pytest.fail(error)
        yield url, token, settings
    finally:
        stop_group(process, grace=10)


def post(url: str, body, token: str | None, params: str = "") -> tuple[int, dict]:
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url + params, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.fixture(scope="module")
def latest(gold) -> pd.DataFrame:
    """Gold transactions that are the latest of both their account and their merchant: the online store holds
    exactly their rows, so their online vector must be their training vector."""
    by_account = gold.groupby("account_id")["event_time"].transform("max") == gold["event_time"]
    by_merchant = gold.groupby("merchant_id")["event_time"].transform("max") == gold["event_time"]
    sample = gold[by_account & by_merchant].reset_index(drop=True)
    assert len(sample) >= 10, f"only {len(sample)} transactions are the latest of their account and merchant"
    return sample


# -- tests ---------------------------------------------------------------------------------------------------
def test_probes_and_401(gateway):
    url, token, _ = gateway
    assert http_status(f"{url}/health") == 200 and http_status(f"{url}/ready") == 200
    status, body = post(f"{url}/v1/score", {"transactions": []}, None)
    assert status == 401
    status, _ = post(f"{url}/v1/score", {"transactions": []}, "not-the-token")
    assert status == 401
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        assert b"decisionflow_gateway_requests_total" in response.read()


def test_online_vector_equals_the_training_vector_and_decisions_match_the_batch_run(
        gateway, latest, feature_store, model_version, mlflow_server, tmp_path):  # noqa: F811
    url, token, settings = gateway
    store, _ = feature_store

    # Online: the gateway's decision (dry run) and the feature vector it used.
    online = {}
    for _, row in latest.iterrows():
        status, body = post(f"{url}/v1/decisions", to_transaction(row), token, "?dry_run=true")
        assert status == 200, body
        assert body["published"] is False and body["model"]["version"] == str(model_version)
        assert body["missing"] == [] and body["stale"] == [], body
        online[row["event_id"]] = body

    # Training: Feast's point-in-time historical retrieval, as build_training_set does.
    entity_rows = latest[["event_id", "account_id", "merchant_id", "amount"]].assign(
        event_timestamp=latest["event_time"])
    training = store.get_historical_features(entity_df=entity_rows,
                                             features=store.get_feature_service(SERVICE)).to_df()
    training = training.set_index("event_id")

    # The gateway's vectors exactly (its own OnlineFeatures over the same store), and as its audit records them
    # (the audit's ``features`` JSON keeps 10 decimals: compared to that precision).
    from decisionflow.features.online import OnlineFeatureReader
    from decisionflow_serving.features import OnlineFeatures

    exact = OnlineFeatures(OnlineFeatureReader(store, SERVICE)).vectors(
        [to_transaction(row) for _, row in latest.iterrows()])
    differences = []

    def compare(event_id, name, got, what, abs_tol):
        expected = training.loc[event_id, name]
        expected = None if pd.isna(expected) else float(expected)
        got = None if got is None else float(got)
        if (expected is None) != (got is None) or (got is not None and not math.isclose(
                got, expected, rel_tol=0.0, abs_tol=abs_tol)):
            differences.append(f"{event_id} {name}: {what} {got!r} training {expected!r}")

    for vector, (event_id, body) in zip(exact, online.items()):
        assert vector.row["event_id"] == event_id
        for name in body["features"]:
            compare(event_id, name, vector.row[name], "online", 0.0)
            compare(event_id, name, body["features"][name], "audit", 5e-11)
    n_features = len(next(iter(online.values()))["features"])
    print(f"\nparity over {len(online)} transactions, {n_features} features each; differences: {len(differences)}")
    for line in differences:
        print("  ", line)
    assert not differences

    # Batch: a real decision run over the same transactions (gold rows) with the same MLflow version.
    from decisionflow.decisions.audit import read_decisions
    from decisionflow.decisions.graph import DecisionContext, MlflowModelSource, run_decisions, sqlite_checkpointer
    from decisionflow.decisions.policy import Policy
    from decisionflow_serving.settings import GatewaySettings

    lake = str(tmp_path / "batch-lake")
    write_table(lake, constants.GOLD_ENRICHED_TABLE, latest)
    ctx = DecisionContext(run_id="batch-parity", lake_root=lake, work_dir=tmp_path / "work",
                          policy=Policy.load(GatewaySettings().policy_path),
                          models=MlflowModelSource(mlflow_server.url, constants.MODEL_NAME, version=model_version),
                          similar=None, deliverers=[])
    with sqlite_checkpointer(tmp_path / "ckpt.sqlite") as saver:
        state = run_decisions(ctx, saver)
    assert state["recorded"] == len(latest)
    batch = read_decisions(lake).set_index("event_id")
    mismatches, overflowed = [], 0
    for event_id, body in online.items():
        row = batch.loc[event_id]
        codes = [str(c) for c in row["reason_codes"]]
        if "REVIEW_BUDGET_OVERFLOW" in codes:  # a batch-only effect (the run's review budget): not comparable
            overflowed += 1
            continue
        same = (body["decision"] == row["decision"] and body["reason_codes"] == codes
                and body["decision_id"] == row["decision_id"] and body["model_version"] == row["model_version"]
                and list(body["actions"]) == [str(a) for a in row["actions"]]
                and bool(body["escalated"]) == bool(row["escalated"])
                and math.isclose(body["score"], float(row["score"]), rel_tol=1e-12, abs_tol=1e-14)
                and json.loads(row["features"]).keys() == body["features"].keys())
        if not same:
            mismatches.append(f"{event_id}: online {body['decision']} {body['reason_codes']} {body['score']} / "
                              f"batch {row['decision']} {codes} {row['score']}")
    mix = pd.Series([b["decision"] for b in online.values()]).value_counts().to_dict()
    print(f"decisions online vs batch: {len(online) - overflowed} compared, mix {mix}, mismatches {len(mismatches)}, "
          f"batch review-budget overflows skipped {overflowed}")
    for line in mismatches:
        print("  ", line)
    assert not mismatches
    assert overflowed < len(online)


def test_score_a_batch_with_one_version(gateway, latest, model_version):
    url, token, _ = gateway
    records = [to_transaction(row) for _, row in latest.iterrows()]
    status, body = post(f"{url}/v1/score", {"transactions": records}, token)
    assert status == 200, body
    assert body["model"] == {"name": constants.MODEL_NAME, "version": str(model_version)}
    assert [s["event_id"] for s in body["scores"]] == [r["event_id"] for r in records]
    assert all(0.0 <= s["score"] <= 1.0 and s["band"] in ("approve", "review", "decline") for s in body["scores"])
    first = body["scores"][0]
    assert set(first["features_as_of"]) == {"account_features", "merchant_features"}
    assert first["features_as_of"]["account_features"].startswith(records[0]["event_time"][:19])


def test_unknown_entities_are_missing_and_old_rows_are_stale(gateway, latest):
    url, token, _ = gateway
    row = latest.iloc[0]
    unknown = {**to_transaction(row), "account_id": "acc-never-seen"}
    status, body = post(f"{url}/v1/decisions", unknown, token, "?dry_run=true")
    assert status == 200, body
    assert body["missing"] == ["account_features"] and body["features"]["txn_count_1h"] is None
    assert body["decision"] == "review" and "FEATURES_MISSING" in body["reason_codes"]
    # the same account, 8 days later: its row is older than account_features' 7 d TTL (Feast serves it anyway)
    later = (row["event_time"] + timedelta(days=8)).strftime("%Y-%m-%dT%H:%M:%SZ")
    status, body = post(f"{url}/v1/score", {"transactions": [{**to_transaction(row), "event_time": later}]}, token)
    assert status == 200 and body["scores"][0]["stale"] == ["account_features"], body


def test_a_published_decision_reaches_the_topic(gateway, latest, kafka_broker):  # noqa: F811
    from confluent_kafka import Consumer, TopicPartition

    url, token, _ = gateway
    status, body = post(f"{url}/v1/decisions", to_transaction(latest.iloc[1]), token)
    assert status == 200 and body["published"] is True, body
    consumer = Consumer({"bootstrap.servers": kafka_broker.bootstrap_servers, "group.id": "gateway-test-read",
                         "enable.auto.commit": False})
    try:
        consumer.assign([TopicPartition(TOPIC, 0, 0)])
        found = None
        for _ in range(40):
            for msg in consumer.consume(100, timeout=0.5):
                if msg.error() is None and msg.key() == body["decision_id"].encode():
                    found = msg
            if found is not None:
                break
    finally:
        consumer.close()
    assert found is not None, "the decision is not on the topic"
    assert dict(found.headers())["origin"] == b"online"
    value = json.loads(found.value())
    assert value["run_id"] == "online" and value["decision"] == body["decision"]
    assert value["features"] == body["features"]


def test_kafka_down_is_a_publish_error_naming_kafka():
    from decisionflow_serving.app import KafkaPublisher, PublishError

    publisher = KafkaPublisher(f"127.0.0.1:{free_port()}", TOPIC, timeout=1.5)
    with pytest.raises(PublishError, match=r"\[kafka\]"):
        publisher.publish("k", "{}")


def test_openapi_fuzz_finds_no_server_error(gateway):
    """Schemathesis cases (positive and negative) for every operation of ``/openapi.json``, against the live
    gateway with a valid token: no 5xx. (Run through Hypothesis directly: schemathesis' pytest plugin reads
    ``item._nodeid``, which pytest 9.2 no longer has.)"""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation import GenerationMode

    url, token, _ = gateway
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    headers = {"Authorization": f"Bearer {token}"}
    failures, calls = [], {}
    for result in schema.get_all_operations():
        operation = result.ok()
        # negative cases only where there is input to break (a GET without parameters has none)
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if operation.method.lower() == "post" else [])
        for mode in modes:
            label = f"{operation.method.upper()} {operation.path} ({mode.value})"  # read while fuzz() runs

            @given(operation.as_strategy(generation_mode=mode))
            @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck),
                      phases=[Phase.explicit, Phase.generate])  # no shrinking: failures are collected
            def fuzz(case):
                response = case.call(base_url=url, headers=headers, timeout=30)
                calls[label] = calls.get(label, 0) + 1
                statuses = calls.setdefault(f"{label} statuses", set())
                statuses.add(response.status_code)
                try:
                    case.validate_response(response, checks=[not_a_server_error])
                except Exception as exc:  # noqa: BLE001 - collected and reported together
                    failures.append(f"{label}: {response.status_code} {response.text[:300]!r} for body "
                                    f"{str(case.body)[:300]} ({type(exc).__name__})")

            fuzz()
    print("\nfuzz:", {k: (sorted(v) if isinstance(v, set) else v) for k, v in calls.items()})
    assert sum(v for v in calls.values() if isinstance(v, int)) >= 100
    assert not failures, "\n".join(failures[:20])
