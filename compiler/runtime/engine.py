"""`load(artifact_dir)` and the Engine's `generate()` / `stream()`.

Both drive the engine core (`runtime/core.py`), the one generation loop kiln has: a batch of
prompts becomes requests that are prefilled in chunks and decoded together, each in its own
cache row, so a batch gives each prompt the tokens it would get alone. `generate()` is the
concatenation of what `stream()` yields. A batch larger than the engine's max_batch queues.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from compiler.runtime.config import EngineConfig
from compiler.runtime.manifest import MANIFEST, read_manifest
from compiler.runtime.generation import Generation, GenerationConfig, Timing
from compiler.runtime.kernel_session import KernelSession
from compiler.runtime.session import DecoderSession
from compiler.runtime.core import EngineCore
from compiler.runtime.settings import RuntimeSettings
from compiler.runtime.speculative import Draft
from compiler.runtime.text import Text

Prompt = str | list[dict]  # plain text, or chat messages

__all__ = ["Draft", "Engine", "Generation", "GenerationConfig", "Prompt", "Timing", "load"]


class Engine:
    def __init__(self, path: Path, threads: int | None = None, config_entries: dict | None = None):
        self.path = Path(path)
        self.config = EngineConfig.load(self.path / "engine.json")
        self.manifest = read_manifest(self.path) if (self.path / MANIFEST).is_file() else None  # kiln.json
        self.text = Text(self.path)
        if self.config.parallel is not None:
            from compiler.runtime.distributed import DistributedSession

            self.session = DistributedSession(self.path, self.config, threads, config_entries)
        elif self.config.backend == "tensorrt":
            from compiler.runtime.tensorrt_session import TensorRTSession

            self.session = TensorRTSession(self.path, self.config)
        elif self.config.session.execution_provider == "CUDAExecutionProvider":
            from compiler.runtime.cuda_session import CudaDecoderSession

            self.session = CudaDecoderSession(self.path, self.config, config_entries)
        elif self.config.steps:
            self.session = KernelSession(self.path, self.config, threads, config_entries)
        else:
            self.session = DecoderSession(self.path, self.config, threads, config_entries)

    # -- public API -----------------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt], config: GenerationConfig | None = None, *, speculate=None,
                 num_speculative: int | None = None, **kw) -> Generation | list[Generation]:
        """speculate: None (the engine's recipe default), "off", "ngram", "draft" or Draft(path)
        (runtime/speculative.py); num_speculative: tokens proposed a step (default adaptive)."""
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], dict))
        batch = [prompts] if single else list(prompts)
        gens: dict[int, Generation] = {}
        settings = RuntimeSettings.for_batch(len(batch), self, speculate, num_speculative)
        for i, piece, gen in self._run(batch, GenerationConfig.of(config, **kw), settings):
            if gen is not None:
                gens[i] = gen
        return gens[0] if single else [gens[i] for i in range(len(batch))]

    def stream(self, prompt: Prompt, config: GenerationConfig | None = None, *, speculate=None,
               num_speculative: int | None = None, **kw) -> Iterator[str]:
        """Yields text pieces of one prompt as they become final; `last_generation` holds the
        whole Generation (and its timing) once the stream ends. speculate: as in generate()."""
        settings = RuntimeSettings.for_batch(1, self, speculate, num_speculative)
        for _, piece, gen in self._run([prompt], GenerationConfig.of(config, **kw), settings):
            if piece:
                yield piece
            if gen is not None:
                self.last_generation = gen

    def core(self, settings: RuntimeSettings | None = None) -> EngineCore:
        """An engine core over this engine (add_request / step / cancel): see runtime/core.py."""
        return (settings or RuntimeSettings()).core(self)

    def _run(self, prompts: list[Prompt], cfg: GenerationConfig, settings: RuntimeSettings
             ) -> Iterator[tuple[int, str, Generation | None]]:
        """(index, text piece, the Generation once it is complete) for a batch of prompts."""
        ids = [self.text.prompt_ids(p, cfg.chat) for p in prompts]
        core = self.core(settings)
        # one generator per prompt: a seeded batch samples each row differently, a single prompt
        # exactly as its seed says
        seeds = [cfg.seed] if len(ids) == 1 or cfg.seed is None else np.random.SeedSequence(cfg.seed).spawn(len(ids))
        rids = {core.add_request(x, cfg, rng=np.random.default_rng(seeds[min(i, len(seeds) - 1)])): i for i, x in enumerate(ids)}
        while core.has_work:
            for out in core.step():
                if out.error is not None:
                    raise out.error
                yield rids[out.request_id], out.text, out.generation if out.finished else None


def load(path: str | Path, threads: int | None = None, config_entries: dict | None = None, verify: bool = True):
    """Load an engine built by `kiln build` (a directory with engine.json and kiln.json): an
    Engine (generate / stream) for decoders, an Encoder (embed) for encoder models.
    verify: check every file against the sha256 recorded in kiln.json first (refuses tampering).
    config_entries: extra ONNX Runtime session config entries (e.g. for debugging)."""
    path = Path(path)
    if not (path / "engine.json").is_file():
        raise FileNotFoundError(f"{path} is not a kiln artifact (no engine.json); build one with `kiln build RECIPE`")
    if verify:
        from compiler.runtime.verify import verify_artifact

        verify_artifact(path)
    config = EngineConfig.load(path / "engine.json")
    try:
        if config.task == "embed":
            from compiler.runtime.encoder import Encoder

            return Encoder(path, config, threads, config_entries)
        return Engine(path, threads, config_entries)
    except _ort_errors() as e:  # a model file that does not match engine.json, or is not an ONNX model
        why = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: ONNX Runtime cannot load this engine ({why}); rebuild the artifact") from None


def _ort_errors() -> tuple[type[Exception], ...]:
    """ONNX Runtime's load-time exception types (plain Exception subclasses of its pybind module)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoSuchFile", "NotImplemented", "RuntimeException")
    return tuple(getattr(state, n) for n in names if hasattr(state, n))
