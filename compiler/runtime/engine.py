"""`load(artifact_dir)` and the Engine's `generate()` / `stream()`.

A batch of prompts is right-padded into one prefill; each sequence then writes its cache at
its own position (position_ids carry it), and masks keep every row to its own tokens, so a
batch gives each prompt the tokens it would get alone. Streaming and non-streaming share one
loop: `generate()` is the concatenation of what `stream()` yields.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from compiler.runtime.config import EngineConfig
from compiler.runtime.sampling import SamplingParams, sample
from compiler.runtime.session import DecoderSession
from compiler.runtime.text import Text, TextStream

Prompt = str | list[dict]  # plain text, or chat messages


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings (not included in the output)
    stop_token_ids: tuple[int, ...] | None = None  # None = the model's eos ids
    chat: bool = False


@dataclass
class Timing:
    prompt_tokens: int = 0
    prefill_ms: float = 0.0
    decode_steps: int = 0
    decode_s: float = 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0

    def summary(self) -> str:
        return (f"prefill {self.prompt_tokens} tok in {self.prefill_ms:.1f} ms | "
                f"decode {self.decode_steps} tok at {self.decode_tok_s:.1f} tok/s")


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    timing: Timing = field(default_factory=Timing)


class Engine:
    def __init__(self, path: Path, threads: int | None = None, config_entries: dict | None = None):
        self.path = Path(path)
        self.config = EngineConfig.load(self.path / "engine.json")
        self.manifest = json.loads((self.path / "kiln.json").read_text()) if (self.path / "kiln.json").is_file() else {}
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
        else:
            self.session = DecoderSession(self.path, self.config, threads, config_entries)

    # -- public API -----------------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt], config: GenerationConfig | None = None, **kw) -> Generation | list[Generation]:
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], dict))
        batch = [prompts] if single else list(prompts)
        gens = [Generation("", [], "length") for _ in batch]
        for i, piece in self.run_rows(batch, _config(config, kw), gens):
            if piece is not None:
                gens[i].text += piece
        return gens[0] if single else gens

    def stream(self, prompt: Prompt, config: GenerationConfig | None = None, **kw) -> Iterator[str]:
        """Yields text pieces of one prompt as they become final; `last_timing` holds the timing."""
        gens = [Generation("", [], "length")]
        for _, piece in self.run_rows([prompt], _config(config, kw), gens):
            if piece is not None:
                yield piece
        self.last_generation = gens[0]

    # -- the loop -------------------------------------------------------------------------
    def _picker(self, io, params: SamplingParams, rng: np.random.Generator, B: int):
        """(ids, positions[, logits_positions]) -> next token per row [B]: sampled inside an engine
        that ends in kiln::Sample (only token ids leave it), else on the host from the logits."""
        if getattr(self.session, "samples", False):
            return lambda ids, pos, at=None: self.session.step(io, ids, pos, at, _sampling_inputs(params, rng, B)).copy()
        return lambda ids, pos, at=None: sample(self.session.step(io, ids, pos, at)[:, -1], params, rng)

    def run_rows(self, prompts: list[Prompt], cfg: GenerationConfig, gens: list[Generation]) -> Iterator[tuple[int, str | None]]:
        """(row, text piece) as text becomes final; (row, None) once a row is complete."""
        yield from self.run_ids([self.text.prompt_ids(p, cfg.chat) for p in prompts], cfg, gens)

    def run_ids(self, ids: list[list[int]], cfg: GenerationConfig, gens: list[Generation]) -> Iterator[tuple[int, str | None]]:
        """run_rows for prompts already tokenized (cfg.chat is not applied again)."""
        lens = np.array([len(x) for x in ids], dtype=np.int64)
        B, S, M = len(ids), int(lens.max()), self.config.max_seq
        if B > self.config.max_batch:
            raise ValueError(f"{B} prompts exceed this engine's max_batch {self.config.max_batch}")
        if S >= M or lens.min() == 0:
            raise ValueError(f"prompt length must be 1..{M - 1} tokens for this engine (max_seq {M}), got {S}")
        params = SamplingParams(cfg.temperature, cfg.top_k, cfg.top_p)
        rng = np.random.default_rng(cfg.seed)
        stops = set(cfg.stop_token_ids if cfg.stop_token_ids is not None else self.config.generation.eos_token_ids)
        streams = [TextStream(self.text, cfg.stop) for _ in range(B)]
        max_new = min(cfg.max_new_tokens, M - S)
        timing = Timing(prompt_tokens=int(lens.sum()))
        for g in gens:
            g.timing = timing

        cache = self.session.new_cache(B)
        io = self.session.binding(cache)
        pad = self.config.generation.pad_token_id
        input_ids = np.array([x + [pad] * (S - len(x)) for x in ids], dtype=np.int64)  # [B, S]
        next_tokens = self._picker(io, params, rng, B)
        t0 = time.perf_counter()
        nxt = next_tokens(input_ids, np.broadcast_to(np.arange(S), (B, S)), (lens - 1)[:, None])  # [B]
        timing.prefill_ms = (time.perf_counter() - t0) * 1e3

        active = np.ones(B, dtype=bool)
        pos = lens.copy()  # where each row's next token goes
        t1 = time.perf_counter()
        for step in range(max_new):
            for b in np.flatnonzero(active):
                tok = int(nxt[b])
                if tok not in stops:
                    gens[b].token_ids.append(tok)
                    piece = streams[b].push(tok)
                    if piece:
                        yield b, piece
                if tok in stops or streams[b].stopped:
                    active[b], gens[b].finish_reason = False, "stop"
                    yield from _close(streams[b], b)
            if not active.any() or step == max_new - 1:
                break
            feed = np.where(active, nxt, pad)[:, None]
            nxt = next_tokens(feed, np.minimum(pos, M - 1)[:, None])
            pos += active
            timing.decode_steps += 1
        timing.decode_s = time.perf_counter() - t1
        for b in np.flatnonzero(active):  # rows that ran to the length limit
            yield from _close(streams[b], b)


def _sampling_inputs(params: SamplingParams, rng: np.random.Generator, B: int) -> dict:
    """kiln::Sample's inputs for one step: the same settings per row, and one uniform draw per
    row taken from rng exactly as the host sampler takes it (none when greedy)."""
    draws = np.zeros(B, np.float32) if params.greedy else rng.random(B).astype(np.float32)
    return {"temperature": np.full(B, params.temperature, np.float32), "top_k": np.full(B, params.top_k, np.int64),
            "top_p": np.full(B, params.top_p, np.float32), "draws": draws}


def _close(stream: TextStream, b: int) -> Iterator[tuple[int, str | None]]:
    """A finished row: its held-back text, then (b, None) to say it is complete."""
    rest = stream.finish()
    if rest:
        yield b, rest
    yield b, None


def _config(config: GenerationConfig | None, kw: dict) -> GenerationConfig:
    cfg = config or GenerationConfig()
    if kw:
        if "stop" in kw and isinstance(kw["stop"], str):
            kw["stop"] = (kw["stop"],)
        cfg = GenerationConfig(**{**cfg.__dict__, **{k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}})
    return cfg


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

            return Encoder(path, config, threads)
        return Engine(path, threads, config_entries)
    except _ort_errors() as e:  # a model file that does not match engine.json, or is not an ONNX model
        why = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: ONNX Runtime cannot load this engine ({why}); rebuild the artifact") from None


def _ort_errors() -> tuple[type[Exception], ...]:
    """ONNX Runtime's load-time exception types (plain Exception subclasses of its pybind module)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoSuchFile", "NotImplemented", "RuntimeException")
    return tuple(getattr(state, n) for n in names if hasattr(state, n))
