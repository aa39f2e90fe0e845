"""The ``case_notes`` Milvus collection: one row per investigator note of ``silver/case_notes``.

Fields (the metadata says what a note is about and how its case ended; nothing from the event generator's
hidden truth):

==================  =====================  ===============================================================
note_id             VARCHAR (primary key)  uuid5 of ``case_id|created_at|author`` (the silver key)
dense               FLOAT_VECTOR(384)      the note text embedded (HNSW, COSINE)
text                VARCHAR, analyzer      the note text (truncated to :data:`TEXT_MAX_BYTES`)
sparse              SPARSE_FLOAT_VECTOR    BM25 of ``text``, computed by Milvus' own BM25 function
case_id, event_id, account_id, author       from silver/case_notes
created_at_ms       INT64                  note creation time, epoch ms (the point-in-time filter)
outcome             VARCHAR                latest silver label of the event: fraud | legit | unknown
outcome_at_ms       INT64                  when that label became known, epoch ms; -1 without a label
label_source        VARCHAR                chargeback | investigation | "" without a label
embedding_model     VARCHAR                the embedder's model id (a changed model re-embeds)
row_hash            VARCHAR                sha256 of every non-vector field: the sync's change detector
==================  =====================  ===============================================================

pymilvus is imported inside the functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from decisionflow.constants import CASE_NOTES_COLLECTION
from decisionflow.exceptions import NonRetryableError

if TYPE_CHECKING:
    from pymilvus import MilvusClient

__all__ = [
    "CASE_NOTES_COLLECTION",
    "CollectionSchemaError",
    "DENSE_FIELD",
    "FIELDS",
    "SPARSE_FIELD",
    "TEXT_MAX_BYTES",
    "drop_collection",
    "ensure_collection",
]

DENSE_FIELD = "dense"
SPARSE_FIELD = "sparse"
TEXT_FIELD = "text"
PRIMARY_FIELD = "note_id"
BM25_FUNCTION = "case_notes_text_bm25"
#: Milvus VARCHAR lengths are bytes (UTF-8); longer note texts are cut at a character boundary.
TEXT_MAX_BYTES = 8192
HNSW_PARAMS = {"M": 16, "efConstruction": 128}

#: name -> (DataType name, max_length for VARCHAR); the dense vector's dim comes from the embedder.
FIELDS: dict[str, tuple[str, int | None]] = {
    PRIMARY_FIELD: ("VARCHAR", 64),
    DENSE_FIELD: ("FLOAT_VECTOR", None),
    TEXT_FIELD: ("VARCHAR", TEXT_MAX_BYTES),
    SPARSE_FIELD: ("SPARSE_FLOAT_VECTOR", None),
    "case_id": ("VARCHAR", 256),
    "event_id": ("VARCHAR", 128),
    "account_id": ("VARCHAR", 256),
    "author": ("VARCHAR", 256),
    "created_at_ms": ("INT64", None),
    "outcome": ("VARCHAR", 16),
    "outcome_at_ms": ("INT64", None),
    "label_source": ("VARCHAR", 64),
    "embedding_model": ("VARCHAR", 128),
    "row_hash": ("VARCHAR", 64),
}
#: Scalar fields returned by searches and read back by the sync.
SCALAR_FIELDS = [f for f, (t, _) in FIELDS.items() if t in ("VARCHAR", "INT64") and f != TEXT_FIELD]


class CollectionSchemaError(NonRetryableError, RuntimeError):
    """An existing collection does not match the spec (other dim, missing field, no BM25 function)."""


def build_schema(dim: int):
    """The ``CollectionSchema`` of the case-notes collection for vectors of ``dim``."""
    from pymilvus import DataType, Function, FunctionType, MilvusClient

    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False,
                                        description="investigators' case notes: similar-case memory")
    for name, (type_name, max_length) in FIELDS.items():
        kwargs: dict[str, Any] = {}
        if max_length:
            kwargs["max_length"] = max_length
        if name == PRIMARY_FIELD:
            kwargs["is_primary"] = True
        if name == DENSE_FIELD:
            kwargs["dim"] = int(dim)
        if name == TEXT_FIELD:
            kwargs["enable_analyzer"] = True  # the BM25 function tokenizes it (standard analyzer)
        schema.add_field(name, getattr(DataType, type_name), **kwargs)
    schema.add_function(Function(name=BM25_FUNCTION, function_type=FunctionType.BM25,
                                 input_field_names=[TEXT_FIELD], output_field_names=[SPARSE_FIELD]))
    return schema


def index_params(client: MilvusClient):
    params = client.prepare_index_params()
    params.add_index(DENSE_FIELD, index_type="HNSW", metric_type="COSINE", params=HNSW_PARAMS)
    params.add_index(SPARSE_FIELD, index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
    return params


def ensure_collection(client: MilvusClient, dim: int = 384, *, collection: str = CASE_NOTES_COLLECTION) -> bool:
    """Create the collection (with its indexes) unless it exists; check an existing one matches the spec.

    Idempotent. The collection is loaded for search either way.

    :param client: an open ``MilvusClient``.
    :param dim: the embedder's dimension.
    :param collection: the collection name (tests use their own).
    :return: True when it was created now.
    :raises CollectionSchemaError: it exists with another dim or without a declared field or the BM25 function;
        the message names both and the remedy (a full resync with ``recreate=True`` drops and rebuilds it).
    """
    if client.has_collection(collection):
        check_schema(client.describe_collection(collection), dim, collection)
        _load(client, collection)
        return False
    client.create_collection(collection, schema=build_schema(dim), index_params=index_params(client),
                             consistency_level="Strong")
    _load(client, collection)
    return True


def check_schema(description: dict[str, Any], dim: int, collection: str = CASE_NOTES_COLLECTION) -> None:
    """Raise :class:`CollectionSchemaError` unless ``describe_collection``'s answer matches the spec."""
    fields = {f["name"]: f for f in description.get("fields", [])}
    problems = []
    for name, (type_name, _) in FIELDS.items():
        field = fields.get(name)
        if field is None:
            problems.append(f"field {name!r} is missing")
            continue
        actual = getattr(field.get("type"), "name", str(field.get("type")))
        if actual != type_name:
            problems.append(f"field {name!r} is {actual}, expected {type_name}")
    dense = fields.get(DENSE_FIELD)
    if dense is not None:
        actual_dim = int((dense.get("params") or {}).get("dim", -1))
        if actual_dim != int(dim):
            problems.append(f"vector field {DENSE_FIELD!r} has dim {actual_dim}, the embedder gives {dim}")
    if fields.get(PRIMARY_FIELD) is not None and not fields[PRIMARY_FIELD].get("is_primary"):
        problems.append(f"field {PRIMARY_FIELD!r} is not the primary key")
    functions = {f.get("name"): f for f in description.get("functions", [])}
    bm25 = functions.get(BM25_FUNCTION)
    if bm25 is None or list(bm25.get("output_field_names") or []) != [SPARSE_FIELD]:
        problems.append(f"BM25 function {BM25_FUNCTION!r} ({TEXT_FIELD} -> {SPARSE_FIELD}) is missing")
    if problems:
        raise CollectionSchemaError(
            f"Milvus collection {collection!r} exists with another schema: {'; '.join(problems)}. Remedy: drop it "
            "and let a full resync rebuild it (MilvusSyncOperator(full=True, recreate=True), or "
            "decisionflow.vectors.sync.sync_case_notes(..., full=True, recreate=True))")


def drop_collection(client: MilvusClient, collection: str = CASE_NOTES_COLLECTION) -> bool:
    """Drop the collection if it exists; True when it did."""
    if client.has_collection(collection):
        client.drop_collection(collection)
        return True
    return False


def _load(client: MilvusClient, collection: str) -> None:
    # A served Milvus answers searches on an unloaded collection slowly or not at all; loading is idempotent.
    try:
        client.load_collection(collection)
    except Exception:  # noqa: BLE001 - Milvus Lite loads implicitly and some versions reject the call
        pass


def truncate_utf8(text: str, max_bytes: int = TEXT_MAX_BYTES) -> str:
    """``text`` cut so that its UTF-8 encoding fits ``max_bytes`` (never in the middle of a character)."""
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text
    return data[:max_bytes].decode("utf-8", errors="ignore")
