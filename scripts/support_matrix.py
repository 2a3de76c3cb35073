"""`make support-matrix`: run one named check per (architecture, backend, precision) cell and
write compiler/support_matrix.json, which `kiln support` shows.

Each cell makes a tiny random-weight checkpoint of its architecture offline (tests/tiny_models.py),
builds the engine with kiln and checks something real about it:

  transformers_parity       onnxruntime fp32 decoders: logits within 1e-3 of transformers on a
                            prompt, and the same greedy tokens for GREEDY_TOKENS new tokens
  transformers_embeddings   onnxruntime fp32 encoders: mean-pooled embeddings with cosine >= 0.9999
                            to transformers' hidden states pooled over the attention mask
  close_to_fp32_engine      quantised engines: the weights are smaller than the fp32 engine's, the
                            engine loads and runs, and its logits are within a loose bound of the
                            fp32 engine's (relative error, top-1 agreement)
  tensorrt_plan_targets     TensorRT (tensorrt_rtx importable): the engine builds and its plan
                            header lists the compute-capability targets asked for
  cuda_transformers_parity  onnxruntime-cuda fp16: parity with transformers (5e-2), where this
                            onnxruntime has the CUDA provider

A check that fails is recorded "failed" and one that cannot run here (a package or provider
missing) "skipped", each with its reason; nothing is marked without its check having run. The
matrix is written either way; the exit status is 1 when a cell failed.
Usage: scripts/support_matrix.py [--out FILE] [--only SUBSTRING --out FILE] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a file: tests.tiny_models and compiler from this checkout
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from compiler.ship.support import SCHEMA  # noqa: E402
from tests.tiny_models import BERT_ARCHS, english_text, make_bert, make_tiny  # noqa: E402

MATRIX = ROOT / "compiler" / "ship" / "support_matrix.json"  # what `kiln support` reads (compiler/ship/support.py)
GREEDY_TOKENS = 16
PROMPT = english_text()[1000:1200]
TRT_TARGETS = ["SM80", "SM89"]
# quantised vs fp32 engine on the prompt: max relative L2 error of the logits, min top-1 agreement
# (measured on the tiny llama, 2026-12: int4-rtn 0.09 / 0.81, int4-awq 0.08 / 0.90, int8-wo
# 0.01 / 0.94, int8-sq 0.04 / 0.97, fp8 0.06 / 0.91), and the most its weight files may weigh
# against the fp32 engine's (fp32 embeddings included: 0.35 for int4, 0.44-0.45 for 8 bits)
KILN_ATTENTION = "onnxruntime-kiln-attention"  # the engine cut at kiln's own CPU attention kernel
KV_BOUNDS = {"int8": (0.02, 0.95), "fp8": (0.06, 0.9), "fp16": (1e-3, 0.99), "bf16": (0.01, 0.98)}  # rel. logit error, top-1
QUANT_BOUNDS = {"int4-rtn": (0.25, 0.6), "int8-wo": (0.05, 0.8), "int4-awq": (0.25, 0.6), "int8-sq": (0.2, 0.6),
                "fp8": (0.2, 0.6)}
MAX_WEIGHTS_RATIO = 0.6
CAL = {"samples": 2, "seq_len": 64}  # calibration of the schemes that need it: enough for a tiny model
QUANT_FIELDS = {"int4-rtn": {"scheme": "int4-rtn", "group_size": 32, "symmetric": True},  # signed: TensorRT takes it too
                "int8-wo": {"scheme": "int8-wo"}, "int4-awq": {"scheme": "int4-awq", "group_size": 32, "calibration": CAL},
                "int8-sq": {"scheme": "int8-sq", "calibration": CAL}, "fp8": {"scheme": "fp8", "calibration": CAL}}
# tiny-model key -> the architecture name kiln's registry knows it by
ARCH_NAMES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
              "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM", "gemma3": "Gemma3ForCausalLM",
              "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
              **{a: a for a in BERT_ARCHS}}


class Failed(Exception):
    """The check ran and the engine did not meet it."""


class Skipped(Exception):
    """The check cannot run on this machine (a package or a provider is missing)."""


@dataclass(frozen=True)
class Cell:
    model: str  # a key of ARCH_NAMES
    backend: str  # onnxruntime | onnxruntime-cuda | tensorrt
    precision: str  # the engine's precision, "+scheme" when quantised: float32+int4-rtn
    check: str  # a name in CHECKS

    @property
    def architecture(self) -> str:
        return ARCH_NAMES[self.model]

    @property
    def key(self) -> str:
        return f"{self.architecture}/{self.backend}/{self.precision}"


# TensorRT: each decoder in the half type its TensorRT build test uses; gemma3's sliding window is
# refused there unless max_seq fits in it, so it has no cell
TRT_PRECISION = {"llama": "float16", "mistral": "bfloat16", "qwen2": "float16", "qwen3": "float16", "phi3": "bfloat16",
                 "mixtral": "float16", "qwen3_moe": "float16"}


def default_cells() -> list[Cell]:
    """Every architecture on onnxruntime fp32; the llama family with the weight-only schemes and
    llama with every calibrated one; each decoder but gemma3 on TensorRT, llama quantised there
    too; llama on the CUDA provider."""
    cells = [Cell(m, "onnxruntime", "float32", "transformers_embeddings" if m in BERT_ARCHS else "transformers_parity")
             for m in ARCH_NAMES]
    cells += [Cell(m, "onnxruntime", f"float32+{q}", "close_to_fp32_engine")
              for m in ("llama", "mistral", "qwen2") for q in ("int4-rtn", "int8-wo")]
    cells += [Cell("llama", "onnxruntime", f"float32+{q}", "close_to_fp32_engine") for q in ("int4-awq", "int8-sq", "fp8")]
    cells += [Cell(m, "tensorrt", p, "tensorrt_plan_targets") for m, p in TRT_PRECISION.items()]
    cells += [Cell("llama", "tensorrt", f"float16+{q}", "tensorrt_plan_targets") for q in ("int4-rtn", "int8-wo", "int8-sq")]
    cells += [Cell("llama", "onnxruntime-cuda", "float16", "cuda_transformers_parity")]
    cells += [Cell(m, KILN_ATTENTION, "float32", "transformers_parity") for m in ARCH_NAMES if m not in BERT_ARCHS]
    cells += [Cell("llama", KILN_ATTENTION, f"float32+kv-{d}", "close_to_fp32_rows") for d in KV_BOUNDS]
    return cells


class Workshop:
    """Checkpoints and artifacts under one work dir, each made once and shared by the cells."""

    def __init__(self, work: Path):
        self.work = Path(work)
        self._ckpts: dict[str, Path] = {}

    def checkpoint(self, model: str) -> Path:
        if model not in self._ckpts:
            from transformers.utils import logging

            logging.disable_progress_bar()
            out = self.work / "checkpoints" / model
            self._ckpts[model] = make_bert(out, model) if model in BERT_ARCHS else make_tiny(model, out)
        named = json.loads((self._ckpts[model] / "config.json").read_text()).get("architectures")
        if named != [ARCH_NAMES[model]]:
            raise Failed(f"the tiny {model} checkpoint says architectures {named}, not [{ARCH_NAMES[model]!r}]")
        return self._ckpts[model]

    def artifact(self, cell: Cell, flavour: str, **fields) -> Path:
        """Build (or reuse, by kiln's own build cache) the cell's checkpoint as engine MODEL-flavour."""
        from compiler.build.driver import build
        from compiler.build.recipe import parse_recipe

        src, name = self.checkpoint(cell.model), f"{cell.model}-{flavour}".lower()
        recipe = parse_recipe({"schema": 1, "name": name, "source": str(src), "max_seq": 256, "max_batch": 2, **fields})
        build(recipe, self.work / "artifacts", progress=False)
        return self.work / "artifacts" / name


def _prompt_ids(engine):
    import numpy as np

    return np.array([engine.text.encode(PROMPT)])


def _all_logits(engine, ids):
    import numpy as np

    s = engine.session
    every = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    return s.step(s.binding(s.new_cache(ids.shape[0])), ids, every, every)


def _hf(src: Path, device: str):
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval().to(device)


def _parity(src: Path, engine, tol: float, device: str = "cpu") -> str:
    import numpy as np
    import torch

    model = _hf(src, device)
    ids = _prompt_ids(engine)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids).to(device)).logits.float().cpu().numpy()
        want = model.generate(torch.from_numpy(ids).to(device), max_new_tokens=GREEDY_TOKENS, min_new_tokens=GREEDY_TOKENS,
                              do_sample=False, eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
    diff = float(np.abs(_all_logits(engine, ids) - ref).max())
    if diff > tol:
        raise Failed(f"max |logit diff| {diff:.2e} > {tol:g} over {ids.shape[1]} prompt tokens")
    got = engine.generate(PROMPT, max_new_tokens=GREEDY_TOKENS, stop_token_ids=()).token_ids
    if got != want:
        first = next(i for i, (a, b) in enumerate(zip(got + [None] * GREEDY_TOKENS, want)) if a != b)
        raise Failed(f"greedy tokens differ from transformers at new token {first}")
    return f"max |logit diff| {diff:.1e} on {ids.shape[1]} prompt tokens; {GREEDY_TOKENS} greedy tokens equal"


def transformers_parity(cell: Cell, shop: Workshop) -> str:
    from compiler.runtime import load

    if cell.backend == KILN_ATTENTION:  # the engine cut at kiln's attention kernel, fp32 rows
        return _parity(shop.checkpoint(cell.model), load(shop.artifact(cell, "kiln-fp32", kv_cache={"attention": "kiln"})), 1e-3)
    return _parity(shop.checkpoint(cell.model), load(shop.artifact(cell, "fp32")), 1e-3)


def close_to_fp32_rows(cell: Cell, shop: Workshop) -> str:
    """KV rows of another dtype (kiln's attention kernel) against the same engine with fp32 rows."""
    import numpy as np

    from compiler.runtime import load

    dtype = cell.precision.split("+kv-", 1)[1]
    max_rel, min_top1 = KV_BOUNDS[dtype]
    ref = load(shop.artifact(cell, "kiln-fp32", kv_cache={"attention": "kiln"}))
    rows = load(shop.artifact(cell, f"kiln-{dtype}", kv_cache={"dtype": dtype}, quality={"gate": False}))
    if rows.config.kv_cache.dtype == ref.config.kv_cache.dtype:
        raise Failed(f"the engine's rows are {rows.config.kv_cache.dtype}, not {dtype}")
    ids = _prompt_ids(ref)
    want, got = _all_logits(ref, ids), _all_logits(rows, ids)
    rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    top1 = float((got.argmax(-1) == want.argmax(-1)).mean())
    if rel > max_rel or top1 < min_top1:
        raise Failed(f"vs fp32 rows: relative logit error {rel:.4f} (bound {max_rel}), top-1 agreement {top1:.2f} (bound {min_top1})")
    return f"vs fp32 rows on {ids.shape[1]} tokens: relative logit error {rel:.4f}, top-1 agreement {top1:.2f}"


def transformers_embeddings(cell: Cell, shop: Workshop) -> str:
    import numpy as np
    import torch
    import transformers

    from compiler.runtime import load

    texts = ["The quick brown fox jumps over the lazy dog.", english_text()[2000:2400], "Short."]
    got = load(shop.artifact(cell, "fp32")).embed(texts)
    src = shop.checkpoint(cell.model)
    tok, model = transformers.AutoTokenizer.from_pretrained(src), transformers.AutoModel.from_pretrained(src).eval()
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    ref = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    if got.shape != ref.shape:
        raise Failed(f"embeddings of shape {list(got.shape)}, transformers gives {list(ref.shape)}")
    cos = float(((got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))).min())
    if cos < 0.9999:
        raise Failed(f"min cosine to transformers' mean-pooled embeddings {cos:.6f} < 0.9999")
    return f"min cosine {cos:.6f} to transformers' mean-pooled embeddings of {len(texts)} texts"


def close_to_fp32_engine(cell: Cell, shop: Workshop) -> str:
    import numpy as np

    from compiler.runtime import load

    scheme = cell.precision.split("+", 1)[1]
    max_rel, min_top1 = QUANT_BOUNDS[scheme]
    ref_dir = shop.artifact(cell, "fp32")
    quant_dir = shop.artifact(cell, scheme, quantization=QUANT_FIELDS[scheme], quality={"gate": False})
    ratio = _weight_bytes(quant_dir) / _weight_bytes(ref_dir)
    if ratio > MAX_WEIGHTS_RATIO:  # close to fp32 because nothing was quantised is no pass
        raise Failed(f"the quantised weights weigh {ratio:.2f} x the fp32 engine's (at most {MAX_WEIGHTS_RATIO})")
    ref, quant = load(ref_dir), load(quant_dir)
    ids = _prompt_ids(ref)
    want, got = _all_logits(ref, ids), _all_logits(quant, ids)
    if not np.isfinite(got).all():
        raise Failed("the quantised engine's logits are not all finite")
    rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    top1 = float((got.argmax(-1) == want.argmax(-1)).mean())
    if rel > max_rel or top1 < min_top1:
        raise Failed(f"vs the fp32 engine: relative logit error {rel:.3f} (bound {max_rel}), top-1 agreement {top1:.2f} "
                     f"(bound {min_top1})")
    return (f"vs the fp32 engine on {ids.shape[1]} tokens: relative logit error {rel:.3f}, top-1 agreement {top1:.2f}; "
            f"weights {ratio:.2f} x fp32")


def _weight_bytes(artifact: Path) -> int:
    return sum(f.stat().st_size for f in artifact.glob("model.onnx*"))


def tensorrt_plan_targets(cell: Cell, shop: Workshop) -> str:
    import importlib.util

    if not any(importlib.util.find_spec(m) for m in ("tensorrt_rtx", "tensorrt")):
        raise Skipped("neither tensorrt_rtx nor tensorrt is importable (pip install 'kiln[tensorrt]')")
    from compiler.runtime.plan import read_plan_header

    precision, _, scheme = cell.precision.partition("+")
    trt = {"precision": precision, "targets": TRT_TARGETS, "timing_cache": str(shop.work / "timing.cache")}
    quant = {"quantization": QUANT_FIELDS[scheme]} if scheme else {}
    art = shop.artifact(cell, f"trt-{cell.precision.replace('+', '-')}", backend="tensorrt", tensorrt=trt, max_seq=128, **quant)
    plan = art / "rank0.engine"
    header = read_plan_header(plan)
    if header.targets != TRT_TARGETS:
        raise Failed(f"plan header lists targets {header.targets}, asked for {TRT_TARGETS}")
    if header.size != plan.stat().st_size:
        raise Failed(f"plan header says {header.size} bytes, the file has {plan.stat().st_size}")
    return f"plan of {header.size} bytes for {', '.join(header.targets)} (TensorRT {header.version}); not run here"


def cuda_transformers_parity(cell: Cell, shop: Workshop) -> str:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise Skipped("this onnxruntime has no CUDAExecutionProvider (kiln[cuda] on an NVIDIA GPU)")
    from compiler.runtime import load

    art = shop.artifact(cell, f"cuda-{cell.precision}",
                        onnxruntime={"device": "cuda", "precision": cell.precision, "graph": "contrib"})
    return _parity(shop.checkpoint(cell.model), load(art), 5e-2, device="cuda")


CHECKS = {f.__name__: f for f in (transformers_parity, transformers_embeddings, close_to_fp32_engine, close_to_fp32_rows,
                                  tensorrt_plan_targets, cuda_transformers_parity)}


def run_cell(cell: Cell, shop: Workshop) -> dict:
    """The cell's record: its check run, with status passed / failed / skipped and why."""
    t0 = time.perf_counter()
    try:
        status, detail = "passed", CHECKS[cell.check](cell, shop)
    except Skipped as e:
        status, detail = "skipped", str(e)
    except Failed as e:
        status, detail = "failed", str(e)
    except Exception as e:  # noqa: BLE001  (a build refusal or a crash of the check is the cell's failure)
        first = (str(e).strip().splitlines() or [""])[0][:300]
        status, detail = "failed", f"{type(e).__name__}: {first}" if first else type(e).__name__
    return {"architecture": cell.architecture, "backend": cell.backend, "precision": cell.precision, "check": cell.check,
            "status": status, "detail": detail, "seconds": round(time.perf_counter() - t0, 1)}


def run(cells: list[Cell], work: Path, progress: bool = True) -> dict:
    """The matrix record for these cells, checked in order with artifacts under `work`."""
    from compiler import __version__

    shop, records, t0 = Workshop(work), [], time.perf_counter()
    for cell in cells:
        records.append(run_cell(cell, shop))
        if progress:
            r = records[-1]
            print(f"{r['status']:7s} {cell.key} [{cell.check}] {r['seconds']}s: {r['detail']}", file=sys.stderr, flush=True)
    return {"schema": SCHEMA, "generated": date.today().isoformat(), "kiln_version": __version__,
            "platform": platform.platform(), "seconds": round(time.perf_counter() - t0, 1), "cells": records}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help=f"the matrix file (default {MATRIX.relative_to(ROOT)})")
    p.add_argument("--only", help="run only the cells whose ARCH/backend/precision contains this (e.g. Llama); needs --out")
    p.add_argument("--work", type=Path, help="keep checkpoints and artifacts here (default: a temp dir, removed)")
    args = p.parse_args(argv)
    if args.only and args.out is None:
        print(f"error: --only writes a partial matrix and {MATRIX.relative_to(ROOT)} is written only whole; "
              "pass --out FILE with --only", file=sys.stderr)
        return 2
    cells = [c for c in default_cells() if not args.only or args.only in c.key]
    if not cells:
        print(f"error: no cell matches {args.only!r}; pass part of one of: {', '.join(c.key for c in default_cells())}",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="kiln-support-") as tmp:
        record = run(cells, args.work or Path(tmp))
    out = args.out or MATRIX
    out.write_text(json.dumps(record, indent=1) + "\n")
    counts = {s: sum(r["status"] == s for r in record["cells"]) for s in ("passed", "failed", "skipped")}
    print(f"wrote {out}: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped "
          f"in {record['seconds']}s", file=sys.stderr)
    return 1 if counts["failed"] else 0  # the matrix is written either way


if __name__ == "__main__":
    sys.exit(main())
