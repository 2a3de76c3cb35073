"""`kiln eval`: the quality of an engine on a fixed token window, alone or against a reference.

The text (by default English prose that ships with Python) is tokenised with the engine's own
tokenizer and the first window+1 ids are kept: inputs ids[:window], targets ids[1:window+1].
The engine runs a chunked prefill at batch 1 and returns logits for every position of each
chunk; log-softmax is taken in float64 chunk by chunk, so at most chunk x vocab logits per
engine are held at once (never window x vocab). With a reference (an artifact, or a checkpoint
that is built into a temporary fp32 engine first) both engines step through the same chunks in
lockstep and give top-1 agreement and the mean KL(reference || engine) per position.
This is the quality gate for quantised builds.
"""

from __future__ import annotations

import gc
import json
import math
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from compiler.build.compile import compile_engine
from compiler.build.recipe import parse_recipe
from compiler.errors import KilnError
from compiler.runtime import load
from compiler.runtime.config import EngineConfig
from compiler.runtime.engine import Engine
from compiler.runtime.text import Text

DEFAULT_SOURCE = "pydoc_data.topics"


@dataclass(frozen=True)
class EvalResult:
    tokens: int  # positions scored (= window)
    perplexity: float
    reference_perplexity: float | None
    top1_agreement: float | None  # fraction of positions where both engines' argmax agree
    mean_kl: float | None  # mean over positions of KL(reference || engine), nats
    window: int
    text_source: str  # "pydoc_data.topics" or the text file's path
    seconds: float  # wall time of the whole evaluation, reference build included

    @property
    def ppl_increase_pct(self) -> float | None:
        if self.reference_perplexity is None:
            return None
        return (self.perplexity / self.reference_perplexity - 1.0) * 100.0

    def to_dict(self) -> dict:
        return {**asdict(self), "ppl_increase_pct": self.ppl_increase_pct}

    def table(self) -> str:
        def num(v: float | None, fmt: str) -> str:
            return "-" if v is None else format(v, fmt)

        rows = [
            ("perplexity", num(self.perplexity, ".4f")),
            ("reference perplexity", num(self.reference_perplexity, ".4f")),
            ("ppl increase", "-" if self.ppl_increase_pct is None else f"{self.ppl_increase_pct:+.3f} %"),
            ("top-1 agreement", num(self.top1_agreement, ".4%")),
            ("mean KL (nats)", num(self.mean_kl, ".3e")),
            ("tokens", str(self.tokens)),
            ("text", self.text_source),
            ("seconds", f"{self.seconds:.1f}"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def default_text() -> str:
    """English prose shipped with Python: the pydoc topics, in sorted-key order (deterministic)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def evaluate(artifact: Path, reference: Path | None = None, text_path: Path | None = None, window: int = 2048,
             chunk: int = 256, threads: int | None = None, progress: bool = True,
             adapters: list[tuple[str, str]] = ()) -> EvalResult:
    """Perplexity of `artifact` on the first `window` predicted tokens of the text; with a
    reference (artifact dir or checkpoint dir) also its perplexity, top-1 agreement and mean KL.
    adapters: (name, path) of LoRA adapters a checkpoint reference is built with (merged)."""
    t0 = time.perf_counter()
    if window < 1 or chunk < 1:
        raise KilnError(f"window ({window}) and chunk ({chunk}) must be positive", "pass --window N with N >= 1")
    _check_window(Path(artifact), window)
    text, source = _read_text(text_path)
    tokens = Text(Path(artifact))
    all_ids = tokens.encode(text)
    if len(all_ids) < window + 1:
        raise KilnError(f"the text has {len(all_ids)} tokens, fewer than window + 1 = {window + 1}",
                        "lower --window or pass a longer --text")
    ids = np.asarray(all_ids[: window + 1], dtype=np.int64)  # [window + 1]
    chunk = min(chunk, window)

    with ExitStack() as stack:
        spill, ref_nll = None, 0.0
        if reference is not None:  # the reference runs first, alone: one engine in memory at a time
            ref = _reference(Path(reference), window, threads, stack, adapters)
            _check_compatible(EngineConfig.load(Path(artifact) / "engine.json"), ref, text, ids)
            spill = stack.enter_context(tempfile.TemporaryFile(prefix="kiln-eval-ref."))
            ref_nll = _spill_reference(ref, ids, chunk, spill, progress)
            del ref
            gc.collect()
        stats = _score(_load_artifact(Path(artifact), threads, window), spill, ids, chunk, progress)
    nll, agree, kl = stats
    return EvalResult(
        tokens=window,
        perplexity=math.exp(nll / window),
        reference_perplexity=None if reference is None else math.exp(ref_nll / window),
        top1_agreement=None if reference is None else agree / window,
        mean_kl=None if reference is None else kl / window,
        window=window,
        text_source=source,
        seconds=time.perf_counter() - t0,
    )


# -- the scoring loop -------------------------------------------------------------------------
def _chunks(engine: Engine, ids: np.ndarray, chunk: int, progress: bool, label: str) -> Iterator:
    """Chunked prefill of ids[:-1]: yields (targets [K], log-probabilities [K, V] float64)."""
    window = len(ids) - 1
    inputs, targets = ids[:-1], ids[1:]  # [W], [W]
    positions = np.arange(window, dtype=np.int64)  # [W]
    binding = engine.session.binding(engine.session.new_cache(1))
    with _bar(progress, (window + chunk - 1) // chunk, label) as tick:
        for s in range(0, window, chunk):
            e = min(s + chunk, window)
            k = np.arange(e - s, dtype=np.int64)[None]  # [1, K] every position of the chunk
            # the step's logits [1, K, V] live in a reused buffer: consumed here by the float64 copy
            yield targets[s:e], _log_softmax(engine.session.step(binding, inputs[None, s:e], positions[None, s:e], k)[0])
            tick()


def _spill_reference(ref: Engine, ids: np.ndarray, chunk: int, spill, progress: bool) -> float:
    """Writes the reference's log-probabilities (float32, chunk after chunk) to `spill`;
    returns its summed NLL (from the float64 values)."""
    nll = 0.0
    for tgt, lp in _chunks(ref, ids, chunk, progress, "reference"):
        nll -= float(lp[np.arange(len(tgt)), tgt].sum())
        spill.write(lp.astype(np.float32).tobytes())
    spill.seek(0)
    return nll


def _score(engine: Engine, spill, ids: np.ndarray, chunk: int, progress: bool) -> tuple[float, int, float]:
    """Returns (sum NLL, top-1 agreements, sum KL(ref || engine)) against the spilled reference."""
    nll = kl = 0.0
    agree = 0
    for tgt, lt in _chunks(engine, ids, chunk, progress, "evaluating"):
        k = np.arange(len(tgt))
        nll -= float(lt[k, tgt].sum())
        if spill is not None:
            lr = np.frombuffer(spill.read(lt.size * 4), dtype=np.float32).reshape(lt.shape).astype(np.float64)
            agree += int((lt.argmax(-1) == lr.argmax(-1)).sum())
            kl += float((np.exp(lr) * (lr - lt)).sum())
    return nll, agree, kl


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """[K, V] float32 -> [K, V] float64 log-probabilities (a new array)."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


@contextmanager
def _bar(progress: bool, total: int, label: str = "evaluating") -> Iterator:
    """Yield `tick()`; with progress=True a rich bar over the chunks on stderr."""
    if not progress:
        yield lambda: None
        return
    try:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    except ImportError:  # runtime-only install: no bar
        yield lambda: None
        return
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(file=sys.stderr), transient=True) as bar:
        task = bar.add_task("chunks", total=total)
        yield lambda: bar.advance(task)


# -- inputs -----------------------------------------------------------------------------------
def _check_window(path: Path, window: int) -> None:
    if not (path / "engine.json").is_file():
        raise KilnError(f"{path} is not a kiln artifact (no engine.json)", "build one with `kiln build RECIPE`")
    max_seq = EngineConfig.load(path / "engine.json").max_seq
    if max_seq < window:
        raise KilnError(f"{path} has max_seq {max_seq}, below the window {window}",
                        f"lower --window or rebuild with max_seq >= {window}")


def _load_artifact(path: Path, threads: int | None, window: int, as_served: bool = True) -> Engine:
    """An artifact under evaluation runs as it serves: its weights prepacked. That matters: without
    prepacking ONNX Runtime takes other kernels for quantised weights (MatMulNBits at accuracy
    level 4 falls back to fp32 activations; int8 MatMulIntegerToFloat takes another path), and the
    gate scored engines nobody runs (SmolLM2 int8-sq: +0.64% unpacked, +1.14% as served; from its
    GGUF at level 4: argmax agreement with fp32 1.00 unpacked, 0.93 as served). The fp32 reference
    kiln builds itself (as_served=False) is loaded without prepacked copies: half the memory, and
    logits within ~1e-4 of the prepacked fp32 engine's (SmolLM2, 300 tokens)."""
    _check_window(path, window)
    # an artifact still being built (the quality gate) has no manifest to verify against yet
    return load(path, threads=threads, config_entries=None if as_served else {"session.disable_prepacking": "1"},
                verify=(path / "kiln.json").is_file())


def _read_text(text_path: Path | None) -> tuple[str, str]:
    if text_path is None:
        return default_text(), DEFAULT_SOURCE
    path = Path(text_path)
    if not path.is_file():
        raise KilnError(f"text file {path} does not exist", "pass an existing UTF-8 text file to --text")
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except UnicodeDecodeError:
        raise KilnError(f"text file {path} is not valid UTF-8", "pass a UTF-8 text file to --text") from None


def _reference(path: Path, window: int, threads: int | None, stack: ExitStack, adapters=()) -> Engine:
    """An artifact dir is loaded as is; a checkpoint dir is built into a temporary fp32 engine."""
    if (path / "engine.json").is_file():
        return _load_artifact(path, threads, window)
    if not (path / "config.json").is_file():
        raise KilnError(f"reference {path} is neither a kiln artifact (engine.json) nor a checkpoint (config.json)",
                        "pass an artifact dir or a Hugging Face checkpoint dir to --reference")
    max_seq = -(-max(window, 256) // 256) * 256  # rounded up to a multiple of 256
    try:
        mpe = json.loads((path / "config.json").read_text()).get("max_position_embeddings")
        if isinstance(mpe, int) and mpe >= window:
            max_seq = min(max_seq, mpe)  # rounding up must not push past the model's limit
    except (OSError, ValueError, AttributeError):
        pass  # the build reports a bad config.json itself
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kiln-eval-ref.")))
    recipe = parse_recipe({"schema": 1, "name": "reference", "source": str(path), "dtype": "float32",
                           "max_seq": max_seq, "max_batch": 1, "onnxruntime": {"graph": "contrib"},
                           "adapters": [{"name": n, "path": p} for n, p in adapters]}, "the fp32 reference")
    try:  # the build's own pipeline, in this process; its memory is handed back before the engines load
        compile_engine(recipe, tmp)
    except KilnError as e:
        raise KilnError(f"building the fp32 reference of {path} failed: {e.problem}", e.fix or "check the reference checkpoint") from None
    return _load_artifact(tmp, threads, window, as_served=False)


def _check_compatible(cfg: EngineConfig, ref: Engine, text: str, ids: np.ndarray) -> None:
    ref_ids = np.asarray(ref.text.encode(text)[: len(ids)], dtype=np.int64)
    if len(ref_ids) != len(ids) or not np.array_equal(ref_ids, ids):
        n = min(len(ref_ids), len(ids))
        at = int(np.flatnonzero(ref_ids[:n] != ids[:n])[0]) if (ref_ids[:n] != ids[:n]).any() else n
        raise KilnError(f"the reference tokenizer gives different ids for the text (first difference at token {at})",
                        "compare against a reference with the same tokenizer")
    if ref.config.vocab_size != cfg.vocab_size:
        raise KilnError(f"the reference vocab size {ref.config.vocab_size} differs from the engine's "
                        f"{cfg.vocab_size}", "compare against a reference of the same model")
