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


# issue 13: a config.json that lies about numbers builds nothing (range and type checks on every number)
LIES = [
    ("llama", {"num_hidden_layers": -1}, ["num_hidden_layers=-1", "outside"]),
    ("llama", {"num_hidden_layers": 0}, ["num_hidden_layers=0"]),
    ("llama", {"num_hidden_layers": 1}, ["not used by the graph", "model.layers.1."]),  # the checkpoint has 2
    ("llama", {"num_hidden_layers": 2.5}, ["num_hidden_layers=2.5", "not an integer"]),
    ("llama", {"hidden_size": "64"}, ["hidden_size='64'", "not an integer"]),
    ("llama", {"rms_norm_eps": "tiny"}, ["rms_norm_eps='tiny'", "not a finite number"]),
    ("llama", {"rms_norm_eps": -1e-5}, ["rms_norm_eps=-1e-05", "outside"]),
    ("llama", {"num_key_value_heads": 8}, ["num_key_value_heads=8", "outside 1..4"]),
    ("llama", {"vocab_size": 0}, ["vocab_size=0"]),
    ("llama", {"tie_word_embeddings": "false"}, ["tie_word_embeddings='false'", "not true or false"]),
    ("llama", {"rope_parameters": "fast"}, ["rope parameters must be a JSON object"]),
    ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": "big"}}, ["rope_theta='big'"]),
    ("llama", {"max_position_embeddings": -512}, ["max_position_embeddings=-512"]),
    ("mistral_window16", {"sliding_window": -16}, ["sliding_window=-16"]),
    ("mixtral", {"num_experts_per_tok": 9}, ["num_experts_per_tok=9", "outside 1..4"]),
    ("qwen3_moe", {"mlp_only_layers": [7]}, ["mlp_only_layers"]),
    ("gemma3", {"query_pre_attn_scalar": 0}, ["query_pre_attn_scalar=0"]),
]


@pytest.mark.parametrize("arch,edit,needles", LIES, ids=[f"{a}-{next(iter(e))}-{i}" for i, (a, e, _) in enumerate(LIES)])
def test_lying_config_is_refused(capsys, tmp_path, tiny_checkpoints, arch, edit, needles):
    test_unsupported_config_is_refused_by_name(capsys, tmp_path, tiny_checkpoints, arch, edit, needles)


def test_unused_checkpoint_weights_are_named(capsys, tmp_path, tiny_checkpoints):
    """An extra tensor in the checkpoint (not a known ignorable buffer) is refused by name."""
    from safetensors.numpy import load_file, save_file

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints["llama"], ckpt)
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.layers.0.mlp.extra_proj.weight"] = tensors["model.norm.weight"].copy()
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = tensors["model.norm.weight"][:8].copy()  # ignorable
    save_file(tensors, ckpt / "model.safetensors")
    err = _expect_error(capsys, tmp_path, ["build", str(_recipe(tmp_path, ckpt))], "model.layers.0.mlp.extra_proj.weight")
    assert "1 weights" in err and "inv_freq" not in err
