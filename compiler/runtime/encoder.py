"""Encoder engines (`task: embed`): texts -> sentence embeddings [N, H].

A batch is tokenised with the model's own tokenizer (special tokens included, as
sentence-transformers does), right-padded, and run once; the engine's graph does the mean
pooling over each row's attention mask.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from compiler.runtime.config import EngineConfig
from compiler.runtime.manifest import MANIFEST, read_manifest
from compiler.runtime.session import session_options
from compiler.runtime.text import Text


class Encoder:
    def __init__(self, path: Path, config: EngineConfig, threads: int | None = None, config_entries: dict | None = None):
        self.path, self.config = Path(path), config
        self.manifest = read_manifest(self.path) if (self.path / MANIFEST).is_file() else None  # kiln.json
        self.text = Text(self.path)
        so = session_options(config.session, threads, config_entries)
        self.session = ort.InferenceSession(str(self.path / config.model_file), so, providers=[config.session.execution_provider])

    def embed(self, texts: str | Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Mean-pooled embeddings [N, H] float32 (not normalised)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = [self._batch(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def embed_ids(self, ids: list[list[int]], batch_size: int = 32) -> np.ndarray:
        """Embeddings [N, H] of prompts given as token ids (special tokens as the caller put them)."""
        out = [self._run(ids[i:i + batch_size]) for i in range(0, len(ids), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def _batch(self, texts: list[str]) -> np.ndarray:
        return self._run([self.text.encode(t) for t in texts])

    def _run(self, ids: list[list[int]]) -> np.ndarray:
        ids = [x[: self.config.max_seq] for x in ids]
        S = max(len(x) for x in ids)
        pad = self.config.generation.pad_token_id
        input_ids = np.array([x + [pad] * (S - len(x)) for x in ids], dtype=np.int64)
        mask = np.array([[1] * len(x) + [0] * (S - len(x)) for x in ids], dtype=np.int64)
        feeds = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": np.zeros_like(input_ids)}
        return self.session.run(["sentence_embedding"], feeds)[0]
