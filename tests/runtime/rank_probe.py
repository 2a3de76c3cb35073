"""Run by each rank (see test_parallel.py): a prefill of fixed token ids with logits at every
position, then decode steps; rank 0 saves the logits [steps] to OUT as .npz.

usage: python rank_probe.py ARTIFACT OUT SEED
"""

import sys

import numpy as np

from compiler.runtime import load


def probe(engine, seed: int) -> list[np.ndarray]:
    """Logits of one prefill (every position) and 4 greedy decode steps, for 2 rows."""
    rng = np.random.default_rng(seed)
    B, S = 2, 21
    ids = rng.integers(3, engine.config.vocab_size, size=(B, S))
    s = engine.session
    io = s.binding(s.new_cache(B))
    out = [s.step(io, ids, np.broadcast_to(np.arange(S), (B, S)), np.broadcast_to(np.arange(S), (B, S))).copy()]
    pos = S
    for _ in range(4):
        nxt = out[-1][:, -1].argmax(-1)[:, None]
        out.append(s.step(io, nxt, np.full((B, 1), pos)).copy())
        pos += 1
    return out


if __name__ == "__main__":
    artifact, dest, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    logits = probe(load(artifact), seed)
    import torch.distributed as dist

    if dist.get_rank() == 0:
        np.savez(dest, *logits)
    dist.destroy_process_group()
