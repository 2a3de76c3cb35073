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

from compiler.errors import KilnError
from compiler.runtime import load
from compiler.runtime.engine import Engine

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
             chunk: int = 256, threads: int | None = None, progress: bool = True) -> EvalResult:
    """Perplexity of `artifact` on the first `window` predicted tokens of the text; with a
    reference (artifact dir or checkpoint dir) also its perplexity, top-1 agreement and mean KL."""
    t0 = time.perf_counter()
    if window < 1 or chunk < 1:
        raise KilnError(f"window ({window}) and chunk ({chunk}) must be positive", "pass --window N with N >= 1")
    engine = _load_artifact(Path(artifact), threads, window)
    text, source = _read_text(text_path)
    all_ids = engine.text.encode(text)
    if len(all_ids) < window + 1:
        raise KilnError(f"the text has {len(all_ids)} tokens, fewer than window + 1 = {window + 1}",
                        "lower --window or pass a longer --text")
    ids = np.asarray(all_ids[: window + 1], dtype=np.int64)  # [window + 1]

    with ExitStack() as stack:
        ref = None
        if reference is not None:
            ref = _reference(Path(reference), window, threads, stack)
            _check_compatible(engine, ref, text, ids)
        stats = _score(engine, ref, ids, min(chunk, window), progress)

    nll, ref_nll, agree, kl = stats
    return EvalResult(
        tokens=window,
        perplexity=math.exp(nll / window),
        reference_perplexity=None if ref is None else math.exp(ref_nll / window),
        top1_agreement=None if ref is None else agree / window,
        mean_kl=None if ref is None else kl / window,
        window=window,
        text_source=source,
        seconds=time.perf_counter() - t0,
    )


# -- the scoring loop -------------------------------------------------------------------------
def _score(engine: Engine, ref: Engine | None, ids: np.ndarray, chunk: int,
           progress: bool) -> tuple[float, float, int, float]:
    """Chunked prefill of ids[:-1] through engine (and ref, in lockstep); returns
    (sum NLL, reference sum NLL, top-1 agreements, sum KL(ref || engine))."""
    window = len(ids) - 1
    inputs, targets = ids[:-1], ids[1:]  # [W], [W]
    positions = np.arange(window, dtype=np.int64)  # [W]
    runs = [(e, e.session.binding(e.session.new_cache(1))) for e in ([engine] if ref is None else [engine, ref])]
    nll = ref_nll = kl = 0.0
    agree = 0
    with _bar(progress, (window + chunk - 1) // chunk) as tick:
        for s in range(0, window, chunk):
            e = min(s + chunk, window)
            k = np.arange(e - s, dtype=np.int64)  # [K] every position of the chunk
            tgt = targets[s:e]  # [K]
            # each step's logits [1, K, V] live in a reused buffer: consumed here by the float64 copy
            logp = [_log_softmax(eng.session.step(b, inputs[None, s:e], positions[None, s:e], k[None])[0])
                    for eng, b in runs]  # each [K, V] float64
            nll -= float(logp[0][k, tgt].sum())
            if ref is not None:
                lt, lr = logp
                ref_nll -= float(lr[k, tgt].sum())
                agree += int((lt.argmax(-1) == lr.argmax(-1)).sum())
                kl += float((np.exp(lr) * (lr - lt)).sum())
            tick()
    return nll, ref_nll, agree, kl


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """[K, V] float32 -> [K, V] float64 log-probabilities (a new array)."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


@contextmanager
def _bar(progress: bool, total: int) -> Iterator:
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
    columns = (TextColumn("evaluating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(file=sys.stderr), transient=True) as bar:
        task = bar.add_task("chunks", total=total)
        yield lambda: bar.advance(task)


# -- inputs -----------------------------------------------------------------------------------
def _load_artifact(path: Path, threads: int | None, window: int) -> Engine:
    if not (path / "engine.json").is_file():
        raise KilnError(f"{path} is not a kiln artifact (no engine.json)", "build one with `kiln build RECIPE`")
    engine = load(path, threads=threads)
    if engine.config.max_seq < window:
        raise KilnError(f"{path} has max_seq {engine.config.max_seq}, below the window {window}",
                        f"lower --window or rebuild with max_seq >= {window}")
    return engine


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


def _reference(path: Path, window: int, threads: int | None, stack: ExitStack) -> Engine:
    """An artifact dir is loaded as is; a checkpoint dir is built into a temporary fp32 engine."""
    if (path / "engine.json").is_file():
        return _load_artifact(path, threads, window)
    if not (path / "config.json").is_file():
        raise KilnError(f"reference {path} is neither a kiln artifact (engine.json) nor a checkpoint (config.json)",
                        "pass an artifact dir or a Hugging Face checkpoint dir to --reference")
    from compiler.build import build
    from compiler.recipe import parse_recipe

    max_seq = -(-max(window, 256) // 256) * 256  # rounded up to a multiple of 256
    try:
        mpe = json.loads((path / "config.json").read_text()).get("max_position_embeddings")
        if isinstance(mpe, int) and mpe >= window:
            max_seq = min(max_seq, mpe)  # rounding up must not push past the model's limit
    except (OSError, ValueError, AttributeError):
        pass  # the build reports a bad config.json itself
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kiln-eval-ref.")))
    recipe = parse_recipe({"schema": 1, "name": "reference", "source": str(path), "dtype": "float32",
                           "max_seq": max_seq, "max_batch": 1, "onnxruntime": {"graph": "contrib"}},
                          f"reference {path}")
    build(recipe, tmp, progress=False)
    return _load_artifact(tmp / "reference", threads, window)


def _check_compatible(engine: Engine, ref: Engine, text: str, ids: np.ndarray) -> None:
    ref_ids = np.asarray(ref.text.encode(text)[: len(ids)], dtype=np.int64)
    if len(ref_ids) != len(ids) or not np.array_equal(ref_ids, ids):
        n = min(len(ref_ids), len(ids))
        at = int(np.flatnonzero(ref_ids[:n] != ids[:n])[0]) if (ref_ids[:n] != ids[:n]).any() else n
        raise KilnError(f"the reference tokenizer gives different ids for the text (first difference at token {at})",
                        "compare against a reference with the same tokenizer")
    if ref.config.vocab_size != engine.config.vocab_size:
        raise KilnError(f"the reference vocab size {ref.config.vocab_size} differs from the engine's "
                        f"{engine.config.vocab_size}", "compare against a reference of the same model")
