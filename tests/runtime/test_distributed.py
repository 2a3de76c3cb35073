"""Multi-rank engines on CPU (gloo on loopback): tp=2, tp=3, pp=2 and tp=2 x pp=2 give the
single-rank engine's logits within 1e-4 (fp32), SmolLM2 at tp=3 gives the same greedy tokens,
and layouts that do not fit are refused before any work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from compiler.cli import main
from compiler.runtime import load
from compiler.runtime.launch import launch
from tests.conftest import SMOLLM2_DIR, build_artifact, make_tiny
from tests.runtime.rank_probe import probe

PROBE = str(Path(__file__).with_name("rank_probe.py"))
# 12 query / 6 KV heads of 16 dims, intermediate 384: divisible by 2 and 3
SHAPE = dict(num_attention_heads=12, num_key_value_heads=6, hidden_size=192, intermediate_size=384, num_hidden_layers=4)
LAYOUTS = {  # name -> (parallel recipe section, graph flavour)
    "tp2": ({"tp": 2}, "contrib"),
    "tp3": ({"tp": 3}, "contrib"),
    "pp2": ({"pp": 2}, "contrib"),
    "tp2xpp2": ({"tp": 2, "pp": 2, "stages": [[0, 1], [1, 4]]}, "contrib"),
    "tp2xpp2-standard": ({"tp": 2, "pp": 2}, "standard"),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    return make_tiny("llama", root / "llama", **SHAPE), root


def _ranked_logits(artifact: Path, world: int, out: Path) -> list[np.ndarray]:
    assert launch(world, [PROBE, str(artifact), str(out), "0"], timeout=240) == 0
    data = np.load(out)
    return [data[f"arr_{i}"] for i in range(len(data.files))]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_rank_logits_equal_single_rank(tiny, name):
    src, root = tiny
    parallel, graph = LAYOUTS[name]
    ref = probe(load(build_artifact(src, root, f"single-{graph}", onnxruntime={"graph": graph})), 0)
    art = build_artifact(src, root, name, onnxruntime={"graph": graph}, parallel=parallel)
    world = parallel.get("tp", 1) * parallel.get("pp", 1)
    got = _ranked_logits(art, world, root / f"{name}.npz")
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert np.abs(a - b).max() <= 1e-4
    assert [int(x) for x in got[-1][:, -1].argmax(-1)] == [int(x) for x in ref[-1][:, -1].argmax(-1)]


def test_manifest_records_the_layout_and_the_bytes_per_rank(tiny):
    src, root = tiny
    art = build_artifact(src, root, "tp2-bytes", parallel={"tp": 2})
    p = json.loads((art / "kiln.json").read_text())["parallel"]
    assert (p["world_size"], p["tp"], p["pp"]) == (2, 2, 1)
    total = p["weight_bytes_single_rank"]
    for r in p["ranks"]:  # sharded weights halve, replicated ones (embeddings, norms, lm_head) stay
        assert r["weight_bytes"] - r["replicated_bytes"] == (total - r["replicated_bytes"]) // 2
        assert {f"rank{r['rank']}.onnx", f"rank{r['rank']}.part0.onnx"} <= set(r["files"])
    H, V, L = 192, 384, 4
    weights = 4 * (2 * V * H + H * (2 * L + 1))  # embedding, lm_head and the norms, fp32
    assert weights <= p["ranks"][0]["replicated_bytes"] <= weights + 32 * 1024  # + rope tables and shape constants
    engine = json.loads((art / "engine.json").read_text())
    assert engine["kv_cache"]["num_kv_heads"] == 3


@pytest.mark.skipif(not (SMOLLM2_DIR / "config.json").is_file(), reason="run `make model` first")
def test_smollm2_tp3_greedy_tokens_equal_single_rank(tmp_path):
    single = build_artifact(SMOLLM2_DIR, tmp_path, "single", max_seq=512, max_batch=1)
    split = build_artifact(SMOLLM2_DIR, tmp_path, "tp3", max_seq=512, max_batch=1, parallel={"tp": 3})
    prompt = "The three primary colours are"
    want = load(single).generate(prompt, max_new_tokens=32).token_ids
    out = subprocess.run([sys.executable, "-m", "compiler.cli", "run", str(split), "--json", "--max-new-tokens", "32",
                          "--prompt", prompt], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["tokens"] == want


def test_head_counts_that_do_not_divide_are_refused(tiny, capsys, tmp_path):
    src, _ = tiny
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"schema: 1\nname: bad\nsource: {src}\nmax_seq: 256\nparallel: {{tp: 5}}\n")
    assert main(["build", str(recipe), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "tensor parallel size 5 must divide the query heads (12), KV heads (6)" in err
    assert "choose parallel.tp from: 1, 2, 3, 6" in err and "\n" not in err
    assert not (tmp_path / "out" / "bad").exists()


@pytest.mark.parametrize("parallel, message", [
    ({"pp": 5}, "5 pipeline stages for 4 layers"),
    ({"pp": 2, "stages": [[0, 2], [3, 4]]}, "do not split layers 0..4 into 2 contiguous"),
])
def test_bad_pipeline_stages_are_refused(tiny, capsys, tmp_path, parallel, message):
    src, _ = tiny
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"schema": 1, "name": "bad", "source": str(src), "max_seq": 256, "parallel": parallel}))
    assert main(["build", str(recipe), "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def test_quantization_with_ranks_is_refused(tiny, capsys, tmp_path):
    src, _ = tiny
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"schema": 1, "name": "bad", "source": str(src), "max_seq": 256, "parallel": {"tp": 2},
                                  "quantization": {"scheme": "int4-rtn"}}))
    assert main(["build", str(recipe), "--out", str(tmp_path / "out")]) == 2
    assert "quantization with parallel.tp/pp > 1 is not supported yet" in capsys.readouterr().err


def test_loading_without_the_ranks_says_how_to_launch(tiny, monkeypatch):
    src, root = tiny
    art = build_artifact(src, root, "tp2-load", parallel={"tp": 2})
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match=r"this engine has 2 ranks \(tp=2 x pp=1\): run it with `kiln run`"):
        load(art)


def test_a_process_group_of_the_wrong_size_is_refused(tiny, tmp_path):
    """3 ranks started for a 2-rank artifact: every rank refuses with the layout it needs."""
    src, root = tiny
    art = build_artifact(src, root, "tp2-wrong", parallel={"tp": 2})
    out = subprocess.run([sys.executable, "-c", "import sys; from compiler.runtime.launch import launch; "
                          f"sys.exit(launch(3, ['-m', 'compiler.cli', 'run', {str(art)!r}, '--prompt', 'hi']))"],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 2
    assert "built for 2 ranks (tp=2 x pp=1) but the process group has 3: launch 2 ranks" in out.stderr


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "phi3", "gemma3", "mixtral"])
def test_tp2_across_architectures(tiny_checkpoints, tmp_path, arch):
    """qkv bias (Qwen2), per-head q/k norms (Qwen3), checkpoint-fused qkv and gate_up split part
    by part (Phi-3), sliding/global layers and sandwich norms (Gemma 3), replicated routed
    experts beside sharded attention (Mixtral)."""
    src = tiny_checkpoints[arch]
    ref = probe(load(build_artifact(src, tmp_path, "single")), 0)
    got = _ranked_logits(build_artifact(src, tmp_path, "tp2", parallel={"tp": 2}), 2, tmp_path / "tp2.npz")
    for a, b in zip(got, ref):
        assert np.abs(a - b).max() <= 1e-4
