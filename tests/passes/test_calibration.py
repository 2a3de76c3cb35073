"""Calibration statistics: the keys, exactness against transformers' activations, layer-by-layer
checkpoint reads, and the calibration token windows."""

from __future__ import annotations

import re

import numpy as np
import pytest

from compiler import passes
from compiler.errors import KilnError
from compiler.frontend import models
from compiler.frontend.checkpoint import Checkpoint
from compiler.passes.quant.calibration import EVAL_TOKENS, CalibrationConfig, calibration_tokens, collect

CFG = CalibrationConfig(samples=3, seq_len=64, keep_rows=32)
LAYERS = 2  # tiny checkpoints
ATOL = 1e-4
RTOL = 1e-4  # down_proj inputs are ~1e-2: relative too, so a small-scale error is not hidden


def merged_graph(src):
    ckpt = Checkpoint.open(src)
    arch = models.lookup(ckpt.config)
    model = arch.build(arch.config(ckpt.config), ckpt, CFG.seq_len)  # max_seq = seq_len
    return passes.PassManager(passes.make(["merge_qkv", "merge_gate_up", "dedupe_constants", "dce"])).run(model)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def calibrated(request, tiny_checkpoints):
    """(checkpoint dir, tokens [N, S], stats) per architecture."""
    src = tiny_checkpoints[request.param]
    tokens = calibration_tokens(src / "tokenizer.json", CFG)
    stats = collect(merged_graph(src), tokens, progress=False, keep_rows=CFG.keep_rows, seed=CFG.seed)
    return src, tokens, stats


@pytest.fixture(scope="module")
def torch_acts(calibrated):
    """name -> X [N*S, K] float32 from transformers: layer 1's qkv and down_proj inputs, lm_head's."""
    import torch
    from transformers import AutoModelForCausalLM

    src, tokens, _ = calibrated
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    layer = model.model.layers[1]
    mlp_in, head_in, qkv = [], [], []
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a: mlp_in.append(a[0])),
             model.lm_head.register_forward_pre_hook(lambda m, a: head_in.append(a[0]))]
    with torch.no_grad():
        for row in tokens:
            out = model(torch.tensor(row[None]), output_hidden_states=True, use_cache=False)
            qkv.append(layer.input_layernorm(out.hidden_states[1]))  # layer 1's input, normed
        down = [layer.mlp.act_fn(layer.mlp.gate_proj(x)) * layer.mlp.up_proj(x) for x in mlp_in]
    for h in hooks:
        h.remove()

    def flat(xs):
        return torch.cat(xs, dim=1).reshape(-1, xs[0].shape[-1]).numpy()  # [N*S, K]

    return {"/layers.1/attn/qkv_proj/MatMul": flat(qkv), "/layers.1/mlp/down_proj/MatMul": flat(down),
            "/lm_head/MatMul": flat(head_in)}


def test_keys_are_the_constant_weight_matmuls(calibrated):
    _, tokens, stats = calibrated
    per_layer = ["attn/qkv_proj", "attn/o_proj", "mlp/gate_up_proj", "mlp/down_proj"]
    assert list(stats) == [f"/layers.{i}/{p}/MatMul" for i in range(LAYERS) for p in per_layer] + ["/lm_head/MatMul"]
    for s in stats.values():
        assert s.count == tokens.size and s.rows.shape == (CFG.keep_rows, s.mean_abs.shape[0])
        assert s.mean_abs.dtype == np.float64 and s.absmax.dtype == np.float32 and s.rows.dtype == np.float32
        assert s.max_abs == pytest.approx(float(s.absmax.max()))


@pytest.mark.parametrize("name", ["/layers.1/attn/qkv_proj/MatMul", "/layers.1/mlp/down_proj/MatMul", "/lm_head/MatMul"])
def test_stats_match_transformers(calibrated, torch_acts, name):
    stats, x = calibrated[2][name], torch_acts[name]
    np.testing.assert_allclose(stats.mean_abs, np.abs(x).mean(axis=0, dtype=np.float64), atol=ATOL * 1e-2, rtol=RTOL)
    np.testing.assert_allclose(stats.absmax, np.abs(x).max(axis=0), atol=ATOL * 1e-2, rtol=RTOL)
    assert stats.max_abs == pytest.approx(float(np.abs(x).max()), abs=ATOL)
    # every kept row is a token row of X
    dist = np.abs(stats.rows[:, None, :] - x[None]).max(axis=-1)  # [R, N*S]
    assert dist.min(axis=1).max() < ATOL


def test_kept_rows_are_the_same_tokens_for_every_linear(calibrated, torch_acts):
    stats = calibrated[2]
    picked = {}
    for name, x in torch_acts.items():
        dist = np.abs(stats[name].rows[:, None, :] - x[None]).max(axis=-1)  # [R, N*S]
        picked[name] = dist.argmin(axis=1)
    first, *rest = picked.values()
    assert len(set(first)) == CFG.keep_rows
    assert all(np.array_equal(first, p) for p in rest)


def test_checkpoint_is_read_one_layer_at_a_time(tiny_checkpoints, monkeypatch):
    """Layer i's weights are read (once each) after layer i-1 ran and before layer i+1 is read."""
    import onnxruntime

    model = merged_graph(tiny_checkpoints["llama"])
    tokens = calibration_tokens(tiny_checkpoints["llama"] / "tokenizer.json", CFG)
    events: list[str] = []  # checkpoint tensor names, and "session" when a part's session is made
    read, session = Checkpoint.read, onnxruntime.InferenceSession

    def recording_read(self, name):
        events.append(name)
        return read(self, name)

    def recording_session(*args, **kwargs):
        events.append("session")
        return session(*args, **kwargs)

    monkeypatch.setattr(Checkpoint, "read", recording_read)
    monkeypatch.setattr(onnxruntime, "InferenceSession", recording_session)
    collect(model, tokens, progress=False, keep_rows=CFG.keep_rows)
    layers = [int(m.group(1)) for n in events if (m := re.match(r"model\.layers\.(\d+)\.", n))]
    assert layers == sorted(layers), "a layer's weights were read after the next layer's"
    assert sorted(set(layers)) == list(range(LAYERS))
    per_layer = [n for n in events if n.startswith("model.layers.")]
    assert len(per_layer) == len(set(per_layer)), "a layer weight was read twice"
    for k, name in enumerate(events):  # parts run in order: prologue, layers.0, layers.1, ...
        if m := re.match(r"model\.layers\.(\d+)\.", name):
            assert events[:k].count("session") == int(m.group(1)) + 1, f"{name} read outside its layer's turn"
    assert events[0] == "model.embed_tokens.weight" and events[-1] == "session"  # epilogue: no lm_head weight needed


def test_calibration_tokens_are_deterministic_and_refuse_bad_texts(tiny_checkpoints, tmp_path):
    tok_path = tiny_checkpoints["llama"] / "tokenizer.json"
    a, b = calibration_tokens(tok_path, CFG), calibration_tokens(tok_path, CFG)
    assert a.shape == (CFG.samples, CFG.seq_len) and a.dtype == np.int64
    assert np.array_equal(a, b)

    short = tmp_path / "short.txt"
    short.write_text("A short text. " * 50, encoding="utf-8")
    with pytest.raises(KilnError, match="fewer than"):
        calibration_tokens(tok_path, CalibrationConfig(source=str(short), samples=3, seq_len=64))
    with pytest.raises(KilnError, match="does not exist"):
        calibration_tokens(tok_path, CalibrationConfig(source=str(tmp_path / "missing.txt")))


def test_calibration_windows_are_disjoint_from_the_evaluation_window(tiny_checkpoints):
    """Where the calibration samples lie in the text's tokens, encoded as `kiln eval` and the
    quality gate encode it: after every position the default evaluation windows score."""
    import inspect

    from compiler.build.evaluate import default_text, evaluate
    from compiler.build.recipe import QualityLimits
    from compiler.runtime.text import Text

    src = tiny_checkpoints["llama"]
    ids = np.asarray(Text(src).encode(default_text()), dtype=np.int64)  # evaluate(): ids[:window + 1]
    cfg = CalibrationConfig(samples=4, seq_len=64)
    cal = calibration_tokens(src / "tokenizer.json", cfg)
    flat, n = cal.ravel(), cal.size
    starts = [int(k) for k in np.flatnonzero(ids[: len(ids) - n + 1] == flat[0]) if np.array_equal(ids[k:k + n], flat)]
    assert len(starts) == 1, "the calibration samples are not one consecutive run of the text's tokens"
    for window in (QualityLimits().window, inspect.signature(evaluate).parameters["window"].default):
        scored = window + 1  # inputs ids[:window], targets ids[1:window + 1]
        assert starts[0] >= scored, f"calibration starts at token {starts[0]}, inside the {window}-token evaluation window"


@pytest.mark.parametrize("quality,calibration", [
    ({"window": 2049}, {}),  # the default texts: both read the pydoc topics
    ({"window": 4096, "text": "SAME"}, {"source": "SAME"}),  # one file for both
])
def test_a_recipe_whose_quality_window_overlaps_calibration_is_refused(tmp_path, capsys, quality, calibration):
    import yaml

    from compiler.cli import main
    from compiler.build.recipe import parse_recipe

    text = tmp_path / "text.txt"
    text.write_text("prose " * 10_000, encoding="utf-8")
    quality = {k: str(text) if v == "SAME" else v for k, v in quality.items()}
    calibration = {k: str(text) if v == "SAME" else v for k, v in calibration.items()}
    data = {"schema": 1, "name": "q", "source": str(tmp_path / "ckpt"), "max_seq": 8192, "quality": quality,
            "quantization": {"scheme": "int4-awq", "calibration": {**calibration, "samples": 2, "seq_len": 64}}}
    with pytest.raises(KilnError, match=rf"quality.window {quality['window']} overlaps the calibration text.*"
                                        rf"lower quality.window to {EVAL_TOKENS - 1} or less"):
        parse_recipe(data)
    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["build", str(path), "--out", str(tmp_path / "artifacts")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "overlaps the calibration text" in err
    assert not (tmp_path / "artifacts").exists()  # refused before any work

    # what is not refused: the window just below, a different text, no gate, a scheme without calibration
    parse_recipe({**data, "quality": {**quality, "window": EVAL_TOKENS - 1}})
    other = tmp_path / "other.txt"
    other.write_text("other prose " * 10_000, encoding="utf-8")
    parse_recipe({**data, "quality": {**quality, "text": str(other)}})
    parse_recipe({**data, "quality": {**quality, "gate": False}})
    parse_recipe({**data, "quantization": {"scheme": "int4-rtn"}})


def test_refuses_a_graph_shorter_than_the_samples(tiny_checkpoints):
    src = tiny_checkpoints["llama"]
    ckpt = Checkpoint.open(src)
    arch = models.lookup(ckpt.config)
    model = arch.build(arch.config(ckpt.config), ckpt, 32)
    with pytest.raises(KilnError, match="max_seq = 64"):
        collect(model, calibration_tokens(src / "tokenizer.json", CFG), progress=False)
