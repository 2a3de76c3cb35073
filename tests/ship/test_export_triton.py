"""`kiln export triton` without a Triton server: the model it writes finds the kiln runtime of
this checkout, and its config declares every generation input the model reads."""

from __future__ import annotations

import json
from pathlib import Path

from compiler.ship.export_triton import export

ROOT = Path(__file__).resolve().parents[2]  # the checkout: it holds compiler/


def test_the_exported_model_puts_this_checkout_on_its_path(tiny_artifacts, tmp_path):
    model_dir = export(tiny_artifacts[("llama", "contrib")], tmp_path / "repo")
    model = (model_dir / "1" / "model.py").read_text()
    assert f"sys.path.insert(0, {json.dumps(str(ROOT))})" in model
    config = (model_dir / "config.pbtxt").read_text()
    for name in ("text_input", "max_tokens", "temperature", "top_k", "top_p", "seed", "stop", "chat"):
        assert f'name: "{name}"' in config, name
