"""Similar past cases for a batch of transactions: batched hybrid search, point in time.

* :func:`query_text` - a coarse description of a transaction in investigators' words, from declared
  structured fields and gold features only (never the memo or any other free text of the event: an instruction
  written in a memo must not reach a decision). Coarse on purpose: many transactions share one text, so the
  embedding cache hits and the search is a profile match, not a lookup of one event.
* :class:`SimilarCaseSearch` - dense (HNSW, cosine) + BM25 over the note text, fused by ``RRFRanker``, in
  ``MilvusClient.hybrid_search`` calls of up to ``batch_size`` queries each.

Point in time: a query sees only notes with ``created_at_ms < before_ms`` (its transaction's event time), and a
note's outcome is reported only when its label was known before that moment (``outcome_at_ms < before_ms``),
else ``unknown``.

Batching with per-query filters: a Milvus search request carries one filter for all its ``nq`` vectors
(``expr_params`` templating is rejected by Milvus Lite 3.2). Queries are therefore grouped by time: a group is a
run of queries (sorted by ``before``) within whose time span at most ``span_notes`` notes were created; it
shares one filter, ``created_at_ms < max(before)``, and asks for ``k + (notes created in the span)`` hits, and
each query then drops the hits created at or after its own ``before``. For the dense search this is exact (the
nearest notes of a subset are the nearest of the superset once the extra notes are dropped, and the request
asked for enough of them); for the hybrid search the RRF fusion is computed over the superset's candidate lists,
so ranks can shift slightly - the point-in-time rule itself always holds. The note creation times that bound the
groups are read once per batch with a small ``query`` over ``[min(before), max(before))``. Within a group each
distinct query text is searched once (query texts are coarse on purpose). ``span_notes=0`` gives the strictest
grouping (only queries that see exactly the same notes share a request): exact for both, but a replay of
history then makes about one request per query.
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from decisionflow.constants import CASE_NOTES_COLLECTION
from decisionflow.vectors.collection import DENSE_FIELD, PRIMARY_FIELD, SPARSE_FIELD

if TYPE_CHECKING:
    from pymilvus import MilvusClient

    from decisionflow.vectors.embedders import Embedder

__all__ = ["CaseQuery", "SimilarCase", "SimilarCaseSearch", "SimilarCaseSearchError", "query_text", "to_ms"]

log = logging.getLogger(__name__)

RRF_K = 60
#: Extra hits asked for so that excluding the query's own event still leaves ``k``.
EXCLUDE_SLACK = 4
#: Milvus caps ``query`` results at 16384 (offset + limit).
QUERY_CAP = 16384
OUTPUT_FIELDS = ["case_id", "event_id", "account_id", "created_at_ms", "outcome", "outcome_at_ms", "label_source"]
#: The note text is only fetched when asked for (``with_text``): it doubles the cost of a batch search.
TEXT_FIELD_OUT = "text"


class SimilarCaseSearchError(RuntimeError):
    """Similar cases cannot be searched (missing or empty collection, store down): names collection and remedy."""


@dataclass(frozen=True)
class CaseQuery:
    """One transaction's search.

    :param text: from :func:`query_text` (declared fields / features only - never memo or notes).
    :param before: the transaction's event time: only notes created strictly before it are seen.
    :param exclude_event_id: leave out notes about this event (the transaction itself, when re-deciding).
    """

    text: str
    before: datetime
    exclude_event_id: str | None = None


@dataclass(frozen=True)
class SimilarCase:
    """A past case note similar to the query, with its outcome as known at the query's ``before``."""

    case_id: str
    note_id: str
    event_id: str
    outcome: str  # fraud | legit | unknown (as known at query time)
    score: float  # RRF score (hybrid) or cosine similarity (dense only); higher = more similar
    created_at: datetime
    label_source: str = ""
    text: str = ""

    def as_dict(self, include_text: bool = False) -> dict[str, Any]:
        """JSON-safe (``created_at`` ISO 8601), for the audit row; the note text only when asked."""
        data = asdict(self)
        data["created_at"] = self.created_at.isoformat()
        data["score"] = round(float(self.score), 6)
        if not include_text:
            data.pop("text")
        return data


def to_ms(value: datetime | Any) -> int:
    """Epoch milliseconds of a datetime (naive = UTC) or a pandas Timestamp."""
    if hasattr(value, "to_pydatetime"):
        value = value.to_pydatetime()
    if not isinstance(value, datetime):
        raise TypeError(f"CaseQuery.before must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    # floor: a transaction at t+0.5 ms sees a note at t, never one at t+1
    return math.floor(value.timestamp() * 1000)


def _quote(value: str) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


class SimilarCaseSearch:
    """Batched, point-in-time similar-case search over the ``case_notes`` collection.

    :param client: an open ``MilvusClient`` (the served Milvus Lite by URI, or a Milvus server).
    :param embedder: the embedder the notes were synced with (same ``model_id``; a cached one).
    :param collection: collection name.
    :param candidates: hits per sub-search (dense, BM25) fed to the RRF fusion (at least ``k``).
    :param ef: HNSW search breadth.
    :param concurrency: point-in-time groups searched at once (threads sharing the client). A replay of history
        makes many small groups; 4 threads measured ~1.3-1.6x on the served Lite (2 cores). 1: sequential.
    :param span_notes: at most this many notes created within one group's time span (see the module doc):
        larger groups mean fewer requests but more hits each (measured at 1.8k notes, 6k queries: 8 is about
        the fastest, 32 takes 1.7x as long); 0 groups only queries that see exactly the same notes.
    :param with_text: also return each note's text (:attr:`SimilarCase.text`; for people and the agent).
    """

    def __init__(self, client: MilvusClient, embedder: Embedder, collection: str = CASE_NOTES_COLLECTION, *,
                 candidates: int = 50, ef: int = 128, concurrency: int = 1, span_notes: int = 8,
                 with_text: bool = False) -> None:
        self.client = client
        self.embedder = embedder
        self.collection = collection
        self.candidates = int(candidates)
        self.ef = int(ef)
        self.concurrency = max(1, int(concurrency))
        self.span_notes = max(0, int(span_notes))
        self._fields = [*OUTPUT_FIELDS, TEXT_FIELD_OUT] if with_text else list(OUTPUT_FIELDS)
        #: requests sent by the last :meth:`search` call (for benchmarks)
        self.last_requests = 0
        self._count_lock = threading.Lock()

    # -- checks -------------------------------------------------------------------------------------------
    def check(self) -> int:
        """Rows in the collection; raises :class:`SimilarCaseSearchError` when it is missing or empty."""
        remedy = "run the sync_case_embeddings DAG (MilvusSyncOperator) after build_lakehouse"
        try:
            exists = self.client.has_collection(self.collection)
        except Exception as exc:  # noqa: BLE001 - pymilvus raises several types for a store that is down
            raise SimilarCaseSearchError(f"vectors: Milvus unreachable ({type(exc).__name__}: {exc}); start it "
                                         "(`make up`) or fix connection milvus_default") from exc
        if not exists:
            raise SimilarCaseSearchError(f"vectors: Milvus collection {self.collection!r} does not exist; {remedy}")
        rows = int(self.client.get_collection_stats(self.collection).get("row_count", 0))
        if rows == 0:
            raise SimilarCaseSearchError(f"vectors: Milvus collection {self.collection!r} is empty; {remedy}")
        return rows

    # -- search -------------------------------------------------------------------------------------------
    def search(self, queries: Sequence[CaseQuery], k: int = 5, *, hybrid: bool = True,
               batch_size: int = 200) -> list[list[SimilarCase]]:
        """The ``k`` most similar notes created before each query's ``before``, best first, one list per query.

        :param queries: the transactions' queries.
        :param k: notes per query.
        :param hybrid: dense + BM25 fused by RRF; ``False``: dense only (cosine).
        :param batch_size: distinct query texts per Milvus request.
        :raises SimilarCaseSearchError: missing or empty collection, Milvus unreachable.
        """
        self.last_requests = 0
        if not queries:
            return []
        if k < 1 or batch_size < 1:
            raise ValueError(f"k and batch_size must be >= 1, got k={k}, batch_size={batch_size}")
        self.check()
        befores = [to_ms(q.before) for q in queries]
        texts = [q.text for q in queries]
        unique = list(dict.fromkeys(texts))
        vectors = dict(zip(unique, self.embedder.encode(unique), strict=True))

        results: list[list[SimilarCase]] = [[] for _ in queries]
        groups = self._groups(befores, self.span_notes)

        def run(item: tuple[list[int], int]) -> None:
            group, created_in_span = item
            # one request per distinct text; each member then keeps the hits created before its own time
            by_text: dict[str, list[int]] = {}
            for i in group:
                by_text.setdefault(texts[i], []).append(i)
            distinct = list(by_text)
            bound = max(befores[i] for i in group)
            limit = k + created_in_span + (EXCLUDE_SLACK if any(queries[i].exclude_event_id for i in group) else 0)
            for start in range(0, len(distinct), batch_size):
                chunk = distinct[start:start + batch_size]
                hits = self._request([vectors[t] for t in chunk], chunk, f"created_at_ms < {bound}", limit, hybrid)
                for text, found in zip(chunk, hits, strict=True):
                    for i in by_text[text]:
                        cases = self._cases(found, queries[i], befores[i])
                        if len(cases) < k and len(found) >= limit:
                            # excluding the event's own notes left too few: ask again with the exclusion in the filter
                            flt = f"created_at_ms < {befores[i]} and event_id != {_quote(queries[i].exclude_event_id)}"
                            cases = self._cases(self._request([vectors[text]], [text], flt, k, hybrid)[0],
                                                queries[i], befores[i])
                        results[i] = cases[:k]

        if self.concurrency > 1 and len(groups) > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(min(self.concurrency, len(groups))) as pool:
                list(pool.map(run, groups))  # list(): re-raise the first error
        else:
            for group in groups:
                run(group)
        return results

    def _groups(self, befores: list[int], span_notes: int) -> list[tuple[list[int], int]]:
        """Query indexes in time order, grouped so that at most ``span_notes`` notes were created within a
        group's time span; each group with that count (the extra hits its shared request must ask for)."""
        order = sorted(range(len(befores)), key=befores.__getitem__)
        lo, hi = befores[order[0]], befores[order[-1]]
        cuts = self._creation_times(lo, hi) if hi > lo else []
        groups: list[tuple[list[int], int]] = []
        members: list[int] = []
        first = last = 0
        for i in order:
            # notes with created_at_ms < before: the count of cut points below it identifies the visible set
            seen = bisect.bisect_left(cuts, befores[i])
            if members and seen - first > span_notes:
                groups.append((members, last - first))
                members = []
            if not members:
                first = seen
            members.append(i)
            last = seen
        if members:
            groups.append((members, last - first))
        return groups

    def _creation_times(self, lo: int, hi: int) -> list[int]:
        """Sorted distinct ``created_at_ms`` of notes in ``[lo, hi)``."""
        flt = f"created_at_ms >= {lo} and created_at_ms < {hi}"
        rows = self.client.query(self.collection, filter=flt, output_fields=["created_at_ms"], limit=QUERY_CAP)
        self.last_requests += 1
        if len(rows) >= QUERY_CAP:
            from decisionflow.vectors.sync import iterate_rows

            rows = list(iterate_rows(self.client, self.collection, flt, ["created_at_ms"], QUERY_CAP // 2))
        return sorted({int(r["created_at_ms"]) for r in rows})

    def _request(self, vectors: list, texts: list[str], flt: str, limit: int, hybrid: bool) -> list[list[dict]]:
        from pymilvus import AnnSearchRequest, RRFRanker

        with self._count_lock:
            self.last_requests += 1
        dense_param = {"metric_type": "COSINE", "params": {"ef": max(self.ef, limit)}}
        data = [v.tolist() if hasattr(v, "tolist") else list(v) for v in vectors]
        try:
            if not hybrid:
                return self.client.search(self.collection, data=data, anns_field=DENSE_FIELD, limit=limit,
                                          filter=flt, search_params=dense_param, output_fields=self._fields)
            candidates = max(self.candidates, limit)
            requests = [
                AnnSearchRequest(data=data, anns_field=DENSE_FIELD, param=dense_param, limit=candidates, filter=flt),
                AnnSearchRequest(data=list(texts), anns_field=SPARSE_FIELD, param={"metric_type": "BM25"},
                                 limit=candidates, filter=flt),
            ]
            return self.client.hybrid_search(self.collection, requests, RRFRanker(RRF_K), limit=limit,
                                             output_fields=self._fields)
        except Exception as exc:  # noqa: BLE001 - name the layer and the collection
            raise SimilarCaseSearchError(f"vectors: search on Milvus collection {self.collection!r} failed: "
                                         f"{type(exc).__name__}: {exc}") from exc

    @staticmethod
    def _cases(hits: Sequence[Mapping[str, Any]], query: CaseQuery, before_ms: int) -> list[SimilarCase]:
        cases = []
        for hit in hits:
            entity = hit.get("entity") or {}
            created = int(entity["created_at_ms"])
            if created >= before_ms:  # the filter guarantees it; kept as a guard against a wrong filter
                continue
            if query.exclude_event_id and entity.get("event_id") == query.exclude_event_id:
                continue
            known = 0 <= int(entity.get("outcome_at_ms", -1)) < before_ms
            cases.append(SimilarCase(
                case_id=str(entity.get("case_id", "")),
                note_id=str(hit.get(PRIMARY_FIELD) or hit.get("id") or entity.get(PRIMARY_FIELD)),
                event_id=str(entity.get("event_id", "")),
                outcome=str(entity.get("outcome")) if known else "unknown",
                score=float(hit.get("distance", 0.0)),
                created_at=datetime.fromtimestamp(created / 1000, tz=timezone.utc),
                label_source=str(entity.get("label_source", "")) if known else "",
                text=str(entity.get("text", "")),
            ))
        return cases


# -- query text ---------------------------------------------------------------------------------------------
#: ISO 18245 merchant category codes -> plain words (the public meaning of the code).
MCC_CATEGORIES = {
    "4121": "ride hailing", "4511": "airline", "4814": "telecom", "4829": "money transfer", "5311":
    "department store", "5411": "grocery", "5541": "fuel", "5732": "electronics", "5812": "restaurant",
    "5814": "fast food", "5912": "pharmacy", "5942": "books", "5944": "jewelry", "5967": "direct marketing",
    "5999": "retail", "6011": "ATM", "6051": "crypto exchange", "7011": "hotel", "7995": "gambling",
}
CHANNEL_WORDS = {
    "card_present": "In-store purchase",
    "ecommerce": "Online purchase at a web shop",
    "mobile": "Mobile app payment",
    "atm": "ATM cash withdrawal",
}
#: The only row keys :func:`query_text` reads.
QUERY_FIELDS = ("channel", "mcc", "amount_to_avg_7d", "txn_count_1h", "distinct_devices_24h",
                "distinct_countries_24h", "seconds_since_prev_txn", "merchant_fraud_rate")


def _number(row: Mapping[str, Any], key: str) -> float | None:
    value = row.get(key)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def query_text(row: Mapping[str, Any]) -> str:
    """A coarse, deterministic description of a transaction for the similar-case search.

    Reads only :data:`QUERY_FIELDS` (channel, merchant category from ``mcc``, spend ratio, velocity, devices,
    countries, time since the previous transaction, merchant fraud rate), each put in a few buckets and
    written the way investigators write notes. Free text (``memo``) is never read.
    """
    channel = str(row.get("channel") or "").strip().lower()
    mcc = str(row.get("mcc") or "").strip()
    category = MCC_CATEGORIES.get(mcc, f"merchant category {mcc}" if mcc else "unknown merchant category")
    article = "an" if category[:1].lower() in "aeiou" else "a"
    parts = [f"{CHANNEL_WORDS.get(channel, 'Payment')} at {article} {category} merchant."]
    unusual = False

    ratio = _number(row, "amount_to_avg_7d")
    if ratio is None:
        parts.append("No spending history for the customer yet.")
    elif ratio < 0.5:
        parts.append("Small amount for this customer.")
    elif ratio < 2:
        parts.append("Amount typical for this customer.")
    elif ratio < 5:
        parts.append("High amount, a few times the customer's usual spend.")
        unusual = True
    else:
        parts.append("Very high amount, many times the customer's usual spend.")
        unusual = True

    count = _number(row, "txn_count_1h")
    if count is not None and count >= 6:
        parts.append("Burst of many transactions within minutes.")
        unusual = True
    elif count is not None and count >= 3:
        parts.append("Several transactions within the hour.")
        unusual = True

    devices = _number(row, "distinct_devices_24h")
    if devices is not None and devices >= 3:
        parts.append("Several different devices today, device never seen before.")
        unusual = True
    elif devices is not None and devices >= 2:
        parts.append("A new device not seen before on this account.")
        unusual = True

    countries = _number(row, "distinct_countries_24h")
    if countries is not None and countries >= 2:
        parts.append("Used in another country the same day.")
        unusual = True

    gap = _number(row, "seconds_since_prev_txn")
    if gap is None:
        parts.append("First transaction seen on the account.")
    elif gap < 120:
        parts.append("Seconds after the previous transaction.")
        unusual = True
    elif gap < 3600:
        parts.append("Minutes after the previous transaction.")
    elif gap > 14 * 86400:
        parts.append("First transaction after weeks of inactivity.")
        unusual = True

    merchant_rate = _number(row, "merchant_fraud_rate")
    if merchant_rate is not None and merchant_rate >= 0.2:
        parts.append("Merchant has several fraud disputes on record.")
        unusual = True
    if not unusual:
        # the words investigators use when a review finds nothing unusual
        parts.append("Routine: amount, place and device are typical for this customer.")
    return " ".join(parts)
