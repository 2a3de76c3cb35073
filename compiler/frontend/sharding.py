"""Parallelism as data: the ShardSpecs an architecture declares, and the layout rules.

A ShardSpec names a projection by its role in its layer (the `kiln.role` the builder tags it
with, compiler/ir/meta.py: the checkpoint-name key with dots, "attn.q_proj") and how tensor
parallelism splits it:
  column  the output features are split: each rank computes whole heads (q/k/v) or a slice of
          the intermediate (gate/up); a fused checkpoint projection followed by a Split
          (Phi-3's qkv_proj, gate_up_proj) is split part by part, so each rank keeps its share
          of every part.
  row     the input features are split: each rank's product is a partial sum, and an
          all-reduce follows (o_proj, down_proj).
Everything not named is replicated on every rank (norms, embeddings, lm_head, routed experts);
the build reports those bytes. One generic pass (compiler/passes/parallel/tensor_parallel.py)
consumes the specs; the frontend's graphs are written head-count agnostic (Reshape to -1) so
that the pass only touches weights, `num_heads` attributes and the KV-cache inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from compiler.errors import KilnError


@dataclass(frozen=True)
class ShardSpec:
    role: str  # the projection's role in its layer, e.g. "attn.q_proj"
    kind: Literal["column", "row"]


@dataclass(frozen=True)
class Layout:
    """tp x pp ranks; rank r = stage * tp + tp_rank. stages: [first, end) layer ranges."""

    tp: int
    pp: int
    stages: tuple[tuple[int, int], ...]

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def coords(self, rank: int) -> tuple[int, int]:
        """rank -> (stage, tp_rank)."""
        return divmod(rank, self.tp)


def valid_tp(num_heads: int, num_kv_heads: int, intermediate: int) -> list[int]:
    return [t for t in range(1, num_heads + 1) if num_heads % t == 0 and num_kv_heads % t == 0 and intermediate % t == 0]


def plan(cfg, tp: int, pp: int, stages: list[tuple[int, int]] | None, arch: str, shardable: bool) -> Layout:
    """Check a tp x pp layout against the model before any work; the rule and the valid sizes
    are named when it does not fit."""
    if tp > 1:
        if not shardable:
            raise KilnError(f"{arch} declares no tensor-parallel shard specs", "set parallel.tp: 1 (pipeline stages work)")
        nq, nkv, inter = cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
        if nq % tp or nkv % tp or inter % tp:
            ok = ", ".join(map(str, valid_tp(nq, nkv, inter)))
            raise KilnError(f"tensor parallel size {tp} must divide the query heads ({nq}), KV heads ({nkv}) and "
                            f"intermediate size ({inter}) of {arch}", f"choose parallel.tp from: {ok}")
    L = cfg.num_layers
    if stages is None:
        if pp > L:
            raise KilnError(f"{pp} pipeline stages for {L} layers", f"choose parallel.pp <= {L}")
        bounds = [round(s * L / pp) for s in range(pp + 1)]
        stages = [(bounds[s], bounds[s + 1]) for s in range(pp)]
    else:
        stages = [tuple(s) for s in stages]
        ends = [0] + [e for _, e in stages]
        if len(stages) != pp or any(a != ends[i] or a >= b for i, (a, b) in enumerate(stages)) or ends[-1] != L:
            raise KilnError(f"parallel.stages {[list(s) for s in stages]} do not split layers 0..{L} into {pp} "
                            "contiguous non-empty ranges", f"e.g. stages: [[0, {L // 2}], [{L // 2}, {L}]] for pp: 2")
    return Layout(tp, pp, tuple(stages))
