"""Checkpoint reading: sharded safetensors, bf16 widening, laziness, digest."""

from __future__ import annotations

import numpy as np
import torch
import transformers

from compiler.frontend.checkpoint import Checkpoint


def test_sharded_checkpoint_reads_like_the_single_file(tiny_checkpoints, tmp_path):
    src = tiny_checkpoints["llama"]
    model = transformers.AutoModelForCausalLM.from_pretrained(src)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    single, sharded = Checkpoint.open(src), Checkpoint.open(tmp_path)
    assert len(sharded.files) > 2
    assert sorted(single.names()) == sorted(sharded.names())
    for name in single.names():
        np.testing.assert_array_equal(single.read(name), sharded.read(name))


def test_bf16_weights_are_widened_exactly(tiny_checkpoints, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"]).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    ckpt = Checkpoint.open(tmp_path)
    name = "model.layers.0.mlp.up_proj.weight"
    assert ckpt.info(name).dtype == "BF16"
    want = model.state_dict()[name].float().numpy()
    np.testing.assert_array_equal(ckpt.read(name), want)


def test_digest_changes_with_the_weights(tiny_checkpoints, tmp_path):
    import shutil

    shutil.copytree(tiny_checkpoints["llama"], tmp_path / "c")
    before = Checkpoint.open(tmp_path / "c").digest()
    data = bytearray((tmp_path / "c" / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (tmp_path / "c" / "model.safetensors").write_bytes(bytes(data))
    assert Checkpoint.open(tmp_path / "c").digest() != before
