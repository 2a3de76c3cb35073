"""Every config key kiln relies on is read explicitly: an unsupported value or a missing key fails
`kiln build` with exit code 2 and a one-line message naming the key (never a silent fallback)."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.test_cli_errors import _expect_error, _recipe

# (architecture of the tiny checkpoint, edit of config.json, words the message must contain)
CASES = [
    ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, ["'yarn'", "not supported"]),
    ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, ["lacks factor"]),
    ("llama", {"rope_parameters": {"rope_type": "default"}}, ["rope_theta"]),
    ("llama", {"hidden_act": "gelu"}, ["hidden_act", "'gelu'"]),
    ("llama", {"rms_norm_eps": None}, ["rms_norm_eps"]),
    ("qwen2", {"use_sliding_window": True}, ["use_sliding_window"]),
    ("qwen3", {"use_sliding_window": True}, ["use_sliding_window"]),
    ("phi3", {"sliding_window": 2047}, ["sliding_window=2047"]),
    ("phi3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8,
                                  "long_factor": [2.0] * 8, "original_max_position_embeddings": 32}},
     ["'longrope'", "past 32 positions", "max_seq <= 32"]),
    ("gemma3", {"final_logit_softcapping": 30.0}, ["final_logit_softcapping"]),
    ("gemma3", {"attn_logit_softcapping": 50.0}, ["attn_logit_softcapping"]),
    ("gemma3", {"hidden_activation": "gelu"}, ["hidden_activation", "'gelu'"]),
    ("gemma3", {"layer_types": ["sliding_attention"]}, ["layer_types"]),
    ("gemma3", {"use_bidirectional_attention": True}, ["use_bidirectional_attention"]),
    ("gemma3", {"query_pre_attn_scalar": None}, ["query_pre_attn_scalar"]),
    ("mixtral", {"num_experts_per_tok": None}, ["num_experts_per_tok"]),
    ("qwen3_moe", {"norm_topk_prob": None}, ["norm_topk_prob"]),
]


@pytest.mark.parametrize("arch,edit,needles", CASES, ids=[f"{a}-{next(iter(e))}-{i}" for i, (a, e, _) in enumerate(CASES)])
def test_unsupported_config_is_refused_by_name(capsys, tmp_path, tiny_checkpoints, arch, edit, needles):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints[arch], ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(edit)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    _expect_error(capsys, tmp_path, ["build", str(_recipe(tmp_path, ckpt))], *needles)
