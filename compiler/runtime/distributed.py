"""Multi-rank engines on torch.distributed: one process per rank, the same `load()/generate()`.

Every rank runs the same generation loop (same prompts, same sampling seed) and its own steps
from engine.json: ONNX Runtime sessions for the parts of its graph, with the collectives
between them done by torch.distributed (gloo on CPU). Pipeline stages after the first receive
the hidden state [B, S, H] from the previous stage's rank of the same tp_rank and send theirs
on; the last stage's logits are broadcast so every rank samples the same next token.

The process group comes from the environment torchrun (or `kiln run`, which launches the ranks
itself) sets: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT. torch is needed only here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from compiler.runtime.config import Capabilities, EngineConfig, ParallelSpec, RankSpec
from compiler.runtime.parts import open_parts, run_part
from compiler.runtime.session import physical_cores, session_options
from compiler.runtime.session_api import checked, last_column, no_sampling, whole_cache

KV_INPUTS = ("past_key.", "past_value.")


class LayoutMismatch(ValueError):
    """The process group does not match the artifact's rank layout."""


def process_group(spec: ParallelSpec):
    """torch.distributed, initialised from the environment when it is not already."""
    try:
        import torch.distributed as dist
    except ImportError:
        raise LayoutMismatch("a multi-rank engine needs torch for torch.distributed: pip install torch") from None
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise LayoutMismatch(f"this engine has {spec.world_size} ranks (tp={spec.tp} x pp={spec.pp}): run it with "
                                 f"`kiln run` (which launches them) or `torchrun --nproc-per-node {spec.world_size}`")
        dist.init_process_group("gloo")
    if dist.get_world_size() != spec.world_size:
        raise LayoutMismatch(f"this engine was built for {spec.world_size} ranks (tp={spec.tp} x pp={spec.pp}) but the "
                             f"process group has {dist.get_world_size()}: launch {spec.world_size} ranks")
    return dist


@dataclass
class RankCache:
    batch: int
    buffers: dict[str, ort.OrtValue]  # past_key.{i} / past_value.{i} of this rank's layers
    _arrays: list[np.ndarray]


class DistributedSession:
    """The Session (runtime/session_api.py) of one rank: every row bound, each call on every rank."""

    SUPPORTS = Capabilities(sliceable=False, paged=False)

    def __init__(self, engine_dir: Path, cfg: EngineConfig, threads: int | None = None, config_entries: dict | None = None):
        self.cfg, spec = cfg, cfg.parallel
        self.capabilities = checked(cfg.capabilities, self.SUPPORTS, "multi-rank")
        if cfg.backend != "onnxruntime":
            raise LayoutMismatch(f"this is a {spec.world_size}-rank {cfg.backend} engine: its collectives run on NCCL between "
                                 "NVIDIA GPUs, which this runtime does not drive yet; build with backend: onnxruntime to run on CPUs")
        self.dist = process_group(spec)
        import torch  # present: process_group imported torch.distributed

        self.as_tensor = torch.from_numpy  # numpy buffers are handed to the collectives without copies
        self.rank = self.dist.get_rank()
        self.me: RankSpec = spec.ranks[self.rank]
        if self.me.rank != self.rank:
            raise LayoutMismatch(f"engine.json lists rank {self.me.rank} at position {self.rank}: the artifact is damaged")
        # every rank creates every group, in the same order (torch.distributed's rule)
        groups = [self.dist.new_group(list(range(s * spec.tp, (s + 1) * spec.tp))) for s in range(spec.pp)]
        self.tp_group = groups[self.me.stage]
        self.last_stage_root = (spec.pp - 1) * spec.tp
        local = int(os.environ.get("LOCAL_WORLD_SIZE", spec.world_size))
        so = session_options(cfg.session, threads, config_entries, cores=max(1, physical_cores() // local))  # cores shared by the ranks
        self.threads = so.intra_op_num_threads
        self.sessions = open_parts(engine_dir, self.me.steps, so)

    # -- the session interface ------------------------------------------------------------
    def new_cache(self, batch: int) -> RankCache:
        kv = self.cfg.kv_cache
        lo, hi = self.me.layers
        names = [f"{p}{i}" for i in range(lo, hi) for p in KV_INPUTS]
        arrays = [np.zeros((batch, kv.num_kv_heads, kv.max_seq, kv.head_dim), dtype=kv.dtype) for _ in names]
        return RankCache(batch, {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in zip(names, arrays)}, arrays)

    def cache_rows(self, cache: RankCache, lo: int, hi: int) -> RankCache:
        return whole_cache(cache, lo, hi)

    def release_row(self, cache: RankCache, row: int) -> None:
        """Rows are plain arrays held whole: nothing goes back."""

    def kv_arrays(self, cache: RankCache) -> list[np.ndarray]:
        raise ValueError("a multi-rank engine holds only its own layers' KV: no whole-model host arrays")

    def binding(self, cache: RankCache) -> dict[str, tuple[ort.IOBinding, list]]:
        """Per part: an IO binding with its layers' caches bound as inputs, and the (present
        name, buffer) pairs its outputs are bound to on every call: the cache is updated in place."""
        out = {}
        for s in self.me.steps:
            if "part" not in s:
                continue
            io = self.sessions[s["part"]].io_binding()
            kv = [n for n in s["inputs"] if n.startswith(KV_INPUTS)]
            for name in kv:
                io.bind_ortvalue_input(name, cache.buffers[name])
            out[s["part"]] = (io, [(n.replace("past_", "present_"), cache.buffers[n]) for n in kv])
        return out

    def step(self, binding: dict, input_ids: np.ndarray, position_ids: np.ndarray,
             logits_positions: np.ndarray | None = None, sampling: dict | None = None) -> np.ndarray:
        """The rank's share of one engine call; returns logits [B, K, V] on every rank."""
        no_sampling(sampling)
        spec, dist = self.cfg.parallel, self.dist
        B, S = input_ids.shape
        logits_positions = last_column(input_ids, logits_positions)
        env = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
               "position_ids": np.ascontiguousarray(position_ids, dtype=np.int64),
               "logits_positions": np.ascontiguousarray(logits_positions, dtype=np.int64)}
        if self.me.stage > 0:
            env["hidden_in"] = self._recv((B, S, spec.hidden_size), self.rank - spec.tp)
        for s in self.me.steps:
            if "part" in s:
                self._run_part(s, binding[s["part"]], env)
            else:
                env[s["output"]] = self._collective(s, env[s["input"]])
        if self.me.stage < spec.pp - 1:
            self._send(env["hidden_out"], self.rank + spec.tp)
        logits = env.get("logits")
        if logits is None:
            logits = np.empty((B, logits_positions.shape[1], self.cfg.vocab_size), dtype=np.float32)
        if spec.pp > 1:
            dist.broadcast(self.as_tensor(logits), src=self.last_stage_root)
        return logits

    # -- pieces ---------------------------------------------------------------------------
    def _run_part(self, s: dict, bound: tuple[ort.IOBinding, list], env: dict) -> None:
        io, kv = bound
        run_part(self.sessions[s["part"]], io, s, env, kv)

    def _collective(self, s: dict, x: np.ndarray) -> np.ndarray:
        if s["collective"] != "AllReduce":
            raise LayoutMismatch(f"collective {s['collective']} is not known to this runtime: update kiln")
        x = np.ascontiguousarray(x)
        if not x.flags.writeable:
            x = x.copy()
        self.dist.all_reduce(self.as_tensor(x), op=self.dist.ReduceOp.SUM, group=self.tp_group)
        return x

    def _send(self, x: np.ndarray, dst: int) -> None:
        self.dist.send(self.as_tensor(np.ascontiguousarray(x, dtype=np.float32)), dst)

    def _recv(self, shape: tuple[int, ...], src: int) -> np.ndarray:
        buf = np.empty(shape, dtype=np.float32)
        self.dist.recv(self.as_tensor(buf), src)
        return buf
