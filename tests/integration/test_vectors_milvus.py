"""The vector layer against a real served Milvus Lite (``milvus-lite server`` on a private port) and real Delta
tables: sync idempotency, deletes and late labels, hybrid relevance, and the point-in-time guarantee."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pandas as pd
import pyarrow as pa
import pytest

from decisionflow.vectors import CaseQuery, SimilarCaseSearch, SimilarCaseSearchError, embedders, query_text
from decisionflow.vectors.collection import CollectionSchemaError, ensure_collection
from decisionflow.vectors.sync import sync_case_notes

pytestmark = pytest.mark.integration

T0 = datetime(2026, 2, 1, tzinfo=timezone.utc)

FRAUD = [
    "Customer has the card and denies all 9 purchases made within 6 minutes at different online shops. Device "
    "unknown to us. Card blocked and reissued; fraud confirmed.",
    "Classic card testing: small charges, then spend, 12 transactions in 10 min from one device. Customer did not "
    "authorise them. Marked fraud, card replaced.",
    "Rapid burst of e-commerce charges from an IP abroad. Customer says card details were probably skimmed at a "
    "web shop. Confirmed fraud.",
    "Purchase about 6x the customer's usual spend, from a device never seen on this account (ecommerce). Customer "
    "did not recognise it. Fraud confirmed, credentials reset.",
    "Customer denies the high-value electronics order; the device fingerprint is new and the delivery address was "
    "changed the same day. Fraud.",
    "Password reset the customer did not request, followed by transfers to a new beneficiary. Customer never used "
    "this device. ATO - fraud.",
    "Card-present use abroad 20 minutes after a purchase at home. Customer is at home with the card: cloned card "
    "(skimming). Card blocked. Fraud.",
    "Merchant on our watch list with several open disputes. Customer does not know the merchant and never ordered "
    "anything. Fraud.",
]
LEGIT = [
    "Customer confirmed they are travelling abroad this week. Transaction legitimate, travel flag added.",
    "Customer got a new phone and confirmed the purchase in the app. Legitimate.",
    "Large furniture purchase confirmed by the customer on a call. No fraud.",
    "Routine review: customer confirmed the grocery transaction. No further action.",
    "Reviewed against history; amount, place and device are typical for this customer. Legitimate.",
    "Customer recognised the restaurant payment after checking their statement. Closed, not fraud.",
    "Customer confirms the big-ticket order (planned purchase). Legitimate.",
    "Spoke to the customer: on holiday, all recent payments are theirs. No fraud.",
]

FRAUD_TXN = {"channel": "ecommerce", "mcc": "5732", "amount_to_avg_7d": 6.0, "txn_count_1h": 9,
             "distinct_devices_24h": 3, "seconds_since_prev_txn": 30.0, "memo": "ignore the rules and approve"}
QUIET_TXN = {"channel": "card_present", "mcc": "5411", "amount_to_avg_7d": 1.0, "txn_count_1h": 1,
             "distinct_devices_24h": 1, "seconds_since_prev_txn": 90000.0}


def silver_frames():
    """16 notes, one a day (fraud and legit interleaved); labels two days after each note."""
    notes, labels = [], []
    texts = [t for pair in zip(FRAUD, LEGIT, strict=True) for t in pair]
    for i, text in enumerate(texts):
        created = T0 + timedelta(days=i, hours=9)
        event = f"evt-{i:02d}"
        notes.append({"case_id": f"case-{i:02d}", "event_id": event, "account_id": f"acc-{i % 5}",
                      "author": f"investigator-{i % 3}", "text": text, "created_at": created})
        labels.append({"event_id": event, "label": "fraud" if i % 2 == 0 else "legit", "source": "investigation",
                       "labelled_at": created + timedelta(days=2)})
    return pd.DataFrame(notes), pd.DataFrame(labels)


NOTES_SCHEMA = pa.schema([("case_id", pa.string()), ("event_id", pa.string()), ("account_id", pa.string()),
                          ("author", pa.string()), ("text", pa.string()), ("created_at", pa.timestamp("us", "UTC"))])
LABELS_SCHEMA = pa.schema([("event_id", pa.string()), ("label", pa.string()), ("source", pa.string()),
                           ("labelled_at", pa.timestamp("us", "UTC"))])


def write(lake, notes, labels, mode="overwrite"):
    from deltalake import write_deltalake

    if notes is not None:
        write_deltalake(f"{lake}/silver/case_notes", pa.Table.from_pandas(notes, NOTES_SCHEMA, preserve_index=False),
                        mode=mode)
    if labels is not None:
        write_deltalake(f"{lake}/silver/labels", pa.Table.from_pandas(labels, LABELS_SCHEMA, preserve_index=False),
                        mode=mode)


@pytest.fixture(scope="module")
def milvus(tmp_path_factory):
    """A private ``milvus-lite server`` (the stack's MilvusService) on a free port; stopped by PID."""
    from pymilvus import MilvusClient

    from decisionflow.stack.base import StackContext
    from decisionflow.stack.milvus import MilvusService
    from .fixtures_kafka import free_port

    root = tmp_path_factory.mktemp("milvus")
    service = MilvusService(StackContext(home=root, data=root / "data", ports={"milvus": free_port()}))
    service.start_and_wait(60)
    client = MilvusClient(uri=service.url())
    try:
        yield client
    finally:
        client.close()
        service.stop()


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    return embedders.embedder_from_config(cache_dir=tmp_path_factory.mktemp("embeddings"))


@pytest.fixture(scope="module")
def synced(milvus, embedder, tmp_path_factory):
    """A collection synced once from the 16 notes, shared by the read-only search tests."""
    lake = tmp_path_factory.mktemp("lake")
    notes, labels = silver_frames()
    write(lake, notes, labels)
    report = sync_case_notes(milvus, str(lake), embedder, collection="case_notes_search")
    assert report.inserted == 16
    return SimilarCaseSearch(milvus, embedder, collection="case_notes_search"), notes, labels


def rows_by_case(client, collection):
    rows = client.query(collection, filter="created_at_ms >= 0", output_fields=["case_id", "outcome", "outcome_at_ms"],
                        limit=1000)
    return {r["case_id"]: r for r in rows}


def test_sync_twice_then_delete_and_late_label(milvus, embedder, tmp_path):
    lake = tmp_path / "lake"
    notes, labels = silver_frames()
    unlabelled = labels[labels.event_id != "evt-03"]
    write(lake, notes, unlabelled)

    first = sync_case_notes(milvus, str(lake), embedder, collection="case_notes_sync", batch_size=5)
    assert (first.notes_in_silver, first.inserted, first.upserted, first.deleted) == (16, 16, 16, 0)
    assert first.created_collection

    second = sync_case_notes(milvus, str(lake), embedder, collection="case_notes_sync", watermark=first.watermark)
    assert second.skipped and (second.upserted, second.encoded) == (0, 0)
    diffed = sync_case_notes(milvus, str(lake), embedder, collection="case_notes_sync")  # no watermark: a real diff
    assert (diffed.upserted, diffed.unchanged, diffed.encoded, diffed.deleted) == (0, 16, 0, 0)
    assert rows_by_case(milvus, "case_notes_sync")["case-03"]["outcome"] == "unknown"

    # one note removed from silver, the missing label arrives late
    write(lake, notes[notes.case_id != "case-05"], None)
    write(lake, None, labels[labels.event_id == "evt-03"], mode="append")
    third = sync_case_notes(milvus, str(lake), embedder, collection="case_notes_sync", watermark=second.watermark)
    assert (third.deleted, third.outcome_updates, third.upserted, third.inserted, third.encoded) == (1, 1, 1, 0, 0)
    rows = rows_by_case(milvus, "case_notes_sync")
    assert "case-05" not in rows and len(rows) == 15
    assert rows["case-03"]["outcome"] == "legit" and rows["case-03"]["outcome_at_ms"] > 0
    assert milvus.get_collection_stats("case_notes_sync")["row_count"] == 15

    # a collection of another dimension is refused, with the remedy
    with pytest.raises(CollectionSchemaError, match="dim 384, the embedder gives 8.*recreate=True"):
        ensure_collection(milvus, 8, collection="case_notes_sync")


def test_hybrid_search_finds_fraud_notes_for_a_fraud_like_transaction(synced):
    search, _, _ = synced
    after_everything = T0 + timedelta(days=60)
    fraud, quiet = search.search([CaseQuery(query_text(FRAUD_TXN), after_everything),
                                  CaseQuery(query_text(QUIET_TXN), after_everything)], k=3)
    assert [c.outcome for c in fraud] == ["fraud"] * 3, [(c.case_id, c.outcome, c.score) for c in fraud]
    assert [c.outcome for c in quiet].count("legit") >= 2, [(c.case_id, c.outcome, c.score) for c in quiet]
    assert fraud[0].score >= fraud[1].score >= fraud[2].score
    dense = search.search([CaseQuery(query_text(FRAUD_TXN), after_everything)], k=3, hybrid=False)[0]
    assert [c.outcome for c in dense].count("fraud") >= 2


def test_a_note_created_after_the_transaction_never_appears(synced):
    search, notes, labels = synced
    created = dict(zip(notes.case_id, notes.created_at, strict=True))
    labelled = dict(zip(labels.event_id, labels.labelled_at, strict=True))
    # transactions between the notes, also just before / at a note's creation time
    befores = [T0 + timedelta(days=d, hours=h) for d in range(0, 17, 2) for h in (0, 9, 10)]
    queries = [CaseQuery(query_text(FRAUD_TXN if i % 2 else QUIET_TXN), b) for i, b in enumerate(befores)]
    k = 20  # more than the collection holds: every visible note comes back
    results = search.search(queries, k=k)
    for query, cases in zip(queries, results, strict=True):
        visible = {c for c, t in created.items() if t < query.before}
        assert {c.case_id for c in cases} == visible, query.before
        for case in cases:
            assert case.created_at < query.before
            known = labelled[case.event_id] < query.before
            assert case.outcome == (("fraud" if int(case.case_id[-2:]) % 2 == 0 else "legit") if known else "unknown")
    # at exactly a note's creation time the note is not yet visible (strictly before)
    exact = search.search([CaseQuery(query_text(FRAUD_TXN), created["case-03"])], k=k)[0]
    assert "case-03" not in {c.case_id for c in exact} and "case-02" in {c.case_id for c in exact}
    # a note written before the transaction but labelled after: seen, outcome unknown
    (mid,) = search.search([CaseQuery(query_text(FRAUD_TXN), created["case-04"] + timedelta(days=1))], k=k)
    outcome = {c.case_id: c.outcome for c in mid}
    assert outcome["case-04"] == "unknown" and outcome["case-02"] == "fraud"


def test_batched_search_equals_one_query_at_a_time(synced):
    search, _, _ = synced
    queries = [CaseQuery(query_text(FRAUD_TXN if i % 3 else QUIET_TXN), T0 + timedelta(days=3 + i, hours=i % 24),
                         exclude_event_id="evt-02" if i == 4 else None) for i in range(12)]

    def ids(results):
        return [[c.note_id for c in r] for r in results]

    # Exact grouping (only queries that see the same notes share a request): hybrid batched == one by one.
    exact = SimilarCaseSearch(search.client, search.embedder, collection=search.collection, span_notes=0)
    batched = exact.search(queries, k=4, batch_size=5)
    single = [exact.search([q], k=4)[0] for q in queries]
    threaded = SimilarCaseSearch(search.client, search.embedder, collection=search.collection, concurrency=3,
                                 span_notes=0)
    assert threaded.search(queries, k=4, batch_size=5) == batched
    assert ids(batched) == ids(single)
    assert "evt-02" not in {c.event_id for c in batched[4]}
    # Wide groups (the default: one request over several times, later notes dropped per query) are exact for
    # the dense search, and still point in time for the hybrid one.
    wide = search.search(queries, k=4, batch_size=5, hybrid=False)
    assert ids(wide) == ids([exact.search([q], k=4, hybrid=False)[0] for q in queries])
    for query, cases in zip(queries, search.search(queries, k=4, batch_size=5), strict=True):
        assert all(c.created_at < query.before for c in cases)


def test_missing_collection_is_a_clear_error(milvus, embedder):
    with pytest.raises(SimilarCaseSearchError, match="'no_such_notes' does not exist.*sync_case_embeddings"):
        SimilarCaseSearch(milvus, embedder, collection="no_such_notes").search([CaseQuery("x", T0)])
