"""Milvus operators: keep the similar-case memory (``case_notes``) in step with the lake."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from decisionflow.constants import CASE_NOTES_COLLECTION
from decisionflow.operators.base import DecisionflowOperatorMixin

if TYPE_CHECKING:
    from airflow.sdk import Asset, Context


class MilvusSyncOperator(DecisionflowOperatorMixin, BaseOperator):
    """
    Sync ``silver/case_notes`` (with the latest ``silver/labels`` outcome of each note's event) into a Milvus
    collection: idempotent upserts by ``note_id``, deletes of notes no longer in silver, bounded batches.

    The work is :func:`decisionflow.vectors.sync.sync_case_notes`. The watermark (the Delta versions of both
    silver tables and the embedding model) is read from the previous event of ``synced_asset`` and written into
    this run's event ``extra``, like ``FeastMaterializeOperator``: when neither table changed, the run reads
    nothing. A label arriving later changes the note's row hash, so already-synced notes get their outcome; the
    text-hash embedding cache means such an update re-encodes nothing. Clearing and rerunning is safe.

    :param collection: the Milvus collection (``case_notes``).
    :param synced_asset: the asset this operator emits on success (``case_embeddings``); its previous event holds
        the watermark. ``None``: no watermark, every run diffs silver against the collection.
    :param full: ignore the watermark and the stored row hashes: upsert every note (templated; ``"true"`` works).
    :param recreate: drop and rebuild the collection first - needed after an embedding-dimension or schema change
        (templated).
    :param batch_size: notes per embedding + upsert call, ids per delete call (bounds memory and RPC size).
    :param embedder: registry name of the embedder (:func:`decisionflow.vectors.embedders.embedder_from_config`);
        ``None``: env ``DECISIONFLOW_EMBEDDER`` or the MiniLM ONNX default.
    :param cache_dir: folder of the embedding cache; ``None``: ``$DECISIONFLOW_DATA/embeddings``.
    :param milvus_conn_id: Airflow connection (type ``milvus``) of the store; the stack serves Milvus Lite at
        ``http://127.0.0.1:19530``.
    :param lake_conn_id: Airflow connection (type ``delta_lake``) whose root holds the silver tables (and storage
        options for an object store).
    :return: the sync's counts (``notes_in_silver``, ``upserted``, ``inserted``, ``outcome_updates``,
        ``deleted``, ``unchanged``, ``encoded``, ``skipped``, ``watermark``, ``seconds``).
    """

    layer = "milvus"

    template_fields: Sequence[str] = ("full", "recreate")

    def __init__(
        self,
        *,
        collection: str = CASE_NOTES_COLLECTION,
        synced_asset: Asset | None = None,
        full: bool | str = False,
        recreate: bool | str = False,
        batch_size: int = 500,
        embedder: str | None = None,
        cache_dir: str | None = None,
        milvus_conn_id: str = "milvus_default",
        lake_conn_id: str = "lake_default",
        **kwargs,
    ) -> None:
        if synced_asset is not None:
            kwargs["inlets"] = [*kwargs.get("inlets", []), synced_asset]
            kwargs["outlets"] = [*kwargs.get("outlets", []), synced_asset]
        super().__init__(**kwargs)
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.collection = collection
        self.synced_asset = synced_asset
        self.full = full
        self.recreate = recreate
        self.batch_size = int(batch_size)
        self.embedder = embedder
        self.cache_dir = cache_dir
        self.milvus_conn_id = milvus_conn_id
        self.lake_conn_id = lake_conn_id

    def execute(self, context: Context) -> dict[str, Any]:
        from pathlib import Path

        from decisionflow.hooks.lake import LakeHook
        from decisionflow.hooks.milvus import MilvusHook
        from decisionflow.operators._asset_events import latest_extra
        from decisionflow.vectors.embedders import embedder_from_config
        from decisionflow.vectors.sync import sync_case_notes

        full, recreate = _flag(self.full), _flag(self.recreate)
        lake = LakeHook(self.lake_conn_id)
        watermark = None
        if self.synced_asset is not None and not (full or recreate):
            watermark = latest_extra(context, self.synced_asset, "watermark")
        embedder = embedder_from_config(self.embedder, cache_dir=Path(self.cache_dir) if self.cache_dir else None)
        self.log.info("syncing %s/%s into Milvus %s collection %r (watermark %s, full=%s, recreate=%s)",
                      lake.root, "silver/case_notes", MilvusHook(self.milvus_conn_id).uri, self.collection,
                      watermark, full, recreate)
        # a fresh platform (no silver yet) raises NotReadyError: the operator base turns it into a skip
        with MilvusHook(self.milvus_conn_id).client() as client:
            report = sync_case_notes(
                client, lake.root, embedder, storage_options=lake.storage_options or None,
                collection=self.collection, watermark=watermark, full=full, recreate=recreate,
                batch_size=self.batch_size, log=self.log.info)
        result = report.as_dict()
        if self.synced_asset is not None and context.get("outlet_events") is not None:
            context["outlet_events"][self.synced_asset].extra = {
                key: result[key] for key in ("watermark", "notes_in_silver", "upserted", "deleted", "outcome_updates",
                                             "encoded", "skipped")}
        return result


def _flag(value: bool | str | None) -> bool:
    """A templated boolean: ``True``/``"true"``/``"1"``/``"yes"`` -> True."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)
