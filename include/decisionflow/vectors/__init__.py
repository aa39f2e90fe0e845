"""Similar past cases: investigators' notes embedded in Milvus, searched point in time (plain Python).

* :mod:`~decisionflow.vectors.embedders` - :class:`Embedder`, the offline MiniLM ONNX model, a text-hash cache,
  :func:`embedder_from_config`.
* :mod:`~decisionflow.vectors.collection` - the ``case_notes`` collection spec, :func:`ensure_collection`.
* :mod:`~decisionflow.vectors.sync` - silver/case_notes + silver/labels -> the collection
  (:func:`sync_case_notes`: upserts, deletes, outcome updates, watermark).
* :mod:`~decisionflow.vectors.search` - :func:`query_text`, :class:`CaseQuery`, :class:`SimilarCase`,
  :class:`SimilarCaseSearch` (batched hybrid dense + BM25 search with RRF, point in time).

Importing this package costs numpy only; pymilvus, deltalake, pandas, onnxruntime load when used.
"""

from decisionflow.vectors.embedders import CachedEmbedder, Embedder, OnnxMiniLMEmbedder, embedder_from_config
from decisionflow.vectors.search import CaseQuery, SimilarCase, SimilarCaseSearch, SimilarCaseSearchError, query_text

__all__ = [
    "CachedEmbedder",
    "CaseQuery",
    "Embedder",
    "OnnxMiniLMEmbedder",
    "SimilarCase",
    "SimilarCaseSearch",
    "SimilarCaseSearchError",
    "embedder_from_config",
    "query_text",
]
