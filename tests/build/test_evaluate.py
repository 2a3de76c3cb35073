"""`kiln eval`: perplexity, top-1 agreement and KL against a reference, on a fixed token window.

Tiny artifacts have max_seq 256, so the window is 200 tokens, in chunks of 64.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from compiler.cli import main
from compiler.build.evaluate import default_text, evaluate

WINDOW, CHUNK = 200, 64


@pytest.mark.parametrize("graph", ["standard", "contrib"])
def test_against_itself(tiny_artifacts, graph):
    art = tiny_artifacts[("llama", graph)]
    res = evaluate(art, reference=art, window=WINDOW, chunk=CHUNK, progress=False)
    assert res.tokens == res.window == WINDOW
    assert res.top1_agreement == 1.0
    assert res.mean_kl < 1e-9
    assert res.perplexity == pytest.approx(res.reference_perplexity, rel=1e-12)
    assert res.perplexity == pytest.approx(_perplexity_in_one_call(art), rel=1e-4)
    assert res.text_source == "pydoc_data.topics"
    d = res.to_dict()
    assert d["ppl_increase_pct"] == pytest.approx(0.0, abs=1e-9) and d["mean_kl"] == res.mean_kl


def _perplexity_in_one_call(art: Path) -> float:
    """The window's perplexity from one engine call with logits at every position, log-softmax in
    numpy: what evaluate() must agree with, computed without any of its code."""
    from compiler.runtime import load

    engine = load(art)
    ids = np.asarray(engine.text.encode(default_text())[: WINDOW + 1], dtype=np.int64)
    s = engine.session
    logits = s.step(s.binding(s.new_cache(1)), ids[None, :-1], np.arange(WINDOW)[None], np.arange(WINDOW)[None])[0]
    logits = logits.astype(np.float64)  # [WINDOW, V]
    top = logits.max(axis=-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))
    return float(np.exp(-logp[np.arange(WINDOW), ids[1:]].mean()))


@pytest.mark.parametrize("graph", ["standard", "contrib"])
def test_chunk_size_does_not_change_perplexity(tiny_artifacts, graph):
    art = tiny_artifacts[("mistral_window16", graph)]  # chunks cross the sliding window too
    small = evaluate(art, window=WINDOW, chunk=CHUNK, progress=False)
    whole = evaluate(art, window=WINDOW, chunk=WINDOW, progress=False)
    assert small.reference_perplexity is None and small.top1_agreement is None and small.mean_kl is None
    assert small.perplexity == pytest.approx(whole.perplexity, rel=1e-6)


def _copy_with(src: Path, dst: Path, edit) -> Path:
    """Copy a checkpoint dir, applying edit(tensors) to its model.safetensors (metadata kept)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    with safe_open(str(f), "np") as h:
        meta = h.metadata()
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f), metadata=meta)
    return dst


@pytest.fixture(scope="module")
def sharp(tiny_checkpoints, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny llama with lm_head x30: its logits are far from uniform (the fixture's give ppl ~ vocab),
    so a perplexity match means something. Returns (checkpoint, contrib artifact)."""
    from tests.conftest import build_artifact

    def scale(t):
        t["lm_head.weight"] = t["lm_head.weight"] * np.float32(30)

    root = tmp_path_factory.mktemp("sharp")
    ckpt = _copy_with(tiny_checkpoints["llama"], root / "ckpt", scale)
    return ckpt, build_artifact(ckpt, root, "sharp", onnxruntime={"graph": "contrib"})


def test_matches_transformers(sharp):
    import torch
    import transformers

    from compiler.runtime import load

    ckpt, art = sharp
    ids = load(art).text.encode(default_text())[: WINDOW + 1]
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    x = torch.tensor(ids, dtype=torch.long)
    with torch.no_grad():
        logits = model(x[None, :-1]).logits[0].double()  # [W, V]
    expected = float(torch.exp(torch.nn.functional.cross_entropy(logits, x[1:])))
    res = evaluate(art, window=WINDOW, chunk=CHUNK, progress=False)
    assert abs(expected / 384 - 1) > 0.1  # not the near-uniform ppl every random model gets
    assert res.perplexity == pytest.approx(expected, rel=1e-4)


def test_perturbed_checkpoint_reference(sharp, tmp_path):
    ckpt, art = sharp

    def perturb(t):
        name = "model.layers.0.mlp.down_proj.weight"
        t[name] = (t[name] + np.random.default_rng(0).normal(0, 0.3, t[name].shape)).astype(t[name].dtype)

    ref = _copy_with(ckpt, tmp_path / "perturbed", perturb)
    res = evaluate(art, reference=ref, window=WINDOW, chunk=CHUNK, progress=False)  # builds the reference
    assert res.top1_agreement < 1.0 or res.mean_kl > 1e-4
    assert res.mean_kl > 0 and res.reference_perplexity != res.perplexity
    same = evaluate(art, reference=ckpt, window=WINDOW, chunk=CHUNK, progress=False)  # the unperturbed source
    assert same.top1_agreement == 1.0 and same.mean_kl < 1e-7  # float noise between the two engines


def test_reference_with_another_tokenizer(tiny_artifacts, tmp_path):
    from compiler.errors import KilnError
    from compiler.runtime import load
    from compiler.runtime.verify import record

    ref = tmp_path / "other-tok"
    shutil.copytree(tiny_artifacts[("llama", "contrib")], ref)
    tok = json.loads((ref / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    used = load(ref).text.encode(default_text())[: WINDOW + 1]
    by_id = {v: k for k, v in vocab.items()}
    a, b = by_id[used[0]], by_id[next(i for i in used if i != used[0])]  # swap the ids of two tokens in the window
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (ref / "tokenizer.json").write_text(json.dumps(tok))
    manifest = json.loads((ref / "kiln.json").read_text())  # a genuinely different artifact, not a tampered one
    record(manifest, [ref / "tokenizer.json"])  # its sha256 and size
    (ref / "kiln.json").write_text(json.dumps(manifest))
    with pytest.raises(KilnError, match="reference tokenizer gives different ids"):
        evaluate(tiny_artifacts[("llama", "contrib")], reference=ref, window=WINDOW, chunk=CHUNK, progress=False)


def _one_error_line(capsys, argv: list[str], *needles: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("kiln: error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


def test_cli_errors(capsys, tiny_artifacts, tmp_path):
    art = str(tiny_artifacts[("llama", "contrib")])
    _one_error_line(capsys, ["eval", art, "--window", "100000"], "max_seq 256", "--window")
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    _one_error_line(capsys, ["eval", art, "--window", "200", "--text", str(short)], "fewer than window + 1")
    _one_error_line(capsys, ["eval", str(tmp_path), "--window", "200"], "not a kiln artifact")
    _one_error_line(capsys, ["eval", art, "--window", "200", "--reference", str(tmp_path)], "neither a kiln artifact")


def test_cli_json_and_table(capsys, tiny_artifacts, tmp_path):
    art = str(tiny_artifacts[("qwen2", "contrib")])
    text = tmp_path / "text.txt"
    text.write_text(default_text()[:20_000])
    assert main(["eval", art, "--reference", art, "--window", "200", "--threads", "1", "--text", str(text), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == 200 and out["top1_agreement"] == 1.0 and out["text_source"] == str(text)
    assert out["perplexity"] > 1.0 and out["seconds"] > 0

    assert main(["eval", art, "--window", "200", "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "perplexity" in table and "top-1 agreement" in table


def test_the_gate_scores_the_engine_as_it_serves(tiny_checkpoints, tmp_path):
    """An int4 engine with int8 activations (accuracy level 4) is evaluated with the kernel it serves
    with: its weights prepacked (unpacked, MatMulNBits falls back to fp32 activations, and the gate
    scored an engine nobody runs)."""
    from compiler.build.evaluate import _load_artifact
    from compiler.runtime import load
    from tests.backends.onnxruntime.test_parity import engine_logits
    from tests.conftest import build_artifact

    art = build_artifact(tiny_checkpoints["llama"], tmp_path, "q4", onnxruntime={"int4_accuracy_level": 4},
                         quantization={"scheme": "int4-rtn", "group_size": 32}, quality={"window": WINDOW})
    ids = np.array([np.random.default_rng(3).integers(3, 300, 40)])
    served = engine_logits(load(art), ids)
    fp32_activations = engine_logits(load(art, config_entries={"session.disable_prepacking": "1"}), ids)
    assert np.abs(served - fp32_activations).max() > 1e-4  # the two kernels differ: the test can fail
    np.testing.assert_array_equal(engine_logits(_load_artifact(art, None, WINDOW), ids), served)
