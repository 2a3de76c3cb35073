"""An encoder engine's ONNX Runtime session takes the engine's session config (threads,
optimisation level, config entries) and the caller's extra entries, as a decoder's does."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
from onnx import TensorProto, helper
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from compiler.runtime import load
from compiler.runtime.config import EngineConfig, SessionConfig, TensorSpec


def tiny_encoder(out):
    """Writes an artifact without a manifest whose graph 'embeds' a row as its float attention mask;
    returns its engine config (not yet written)."""
    ids = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"])
           for n in ("input_ids", "attention_mask", "token_type_ids")]
    emb = helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", "seq"])
    node = helper.make_node("Cast", ["attention_mask"], ["sentence_embedding"], to=TensorProto.FLOAT)
    graph = helper.make_graph([node], "encoder", ids, [emb])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(out / "model.onnx"))
    tok = Tokenizer(WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(out / "tokenizer.json"))
    return EngineConfig(backend="onnxruntime", model_file="model.onnx", task="embed", kv_cache=None,
                       inputs=[TensorSpec("input_ids", "int64", ["batch", "seq"])],
                       outputs=[TensorSpec("sentence_embedding", "float32", ["batch", "seq"])],
                       max_batch=4, max_seq=16, vocab_size=3,
                       session=SessionConfig(intra_op_threads=1, graph_optimization_level="ORT_ENABLE_BASIC",
                                             config_entries={"session.intra_op.allow_spinning": "0"}))


def test_encoder_session_honours_the_engine_config(tmp_path):
    cfg = tiny_encoder(tmp_path)
    (tmp_path / "engine.json").write_text(cfg.to_json())
    enc = load(tmp_path, verify=False, config_entries={"session.inter_op.allow_spinning": "0"})
    so = enc.session.get_session_options()
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"  # the engine's
    assert so.get_session_config_entry("session.inter_op.allow_spinning") == "0"  # the caller's
    assert so.intra_op_num_threads == 1
    assert so.graph_optimization_level.name == "ORT_ENABLE_BASIC"
    np.testing.assert_array_equal(enc.embed(["a b", "a"]), [[1, 1], [1, 0]])


def test_caller_threads_and_entries_override_the_engine(tmp_path):
    cfg = tiny_encoder(tmp_path)
    cfg = replace(cfg, session=replace(cfg.session, config_entries={"session.intra_op.allow_spinning": "1"}))
    (tmp_path / "engine.json").write_text(cfg.to_json())
    enc = load(tmp_path, threads=2, verify=False, config_entries={"session.intra_op.allow_spinning": "0"})
    so = enc.session.get_session_options()
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert so.intra_op_num_threads == 2
