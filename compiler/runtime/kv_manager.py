"""The KV manager: the one owner of an engine core's KV memory (rows, the block budget, prefix reuse).

Nothing else in the runtime touches cache arrays. The scheduler asks it to admit a request (a
row and the blocks of its prompt plus its token limit) and, before each prompt chunk, to reuse
any stored prefix of it; the model runner asks it for the binding of a row span; the core tells
it when a sequence completed prefix blocks (keep) and when a sequence ends (release).

    kv = KVManager(session, engine_config, rows=8, kv_cache_gib=2.0, prefix_tokens=4096, block_size=16)
    kv.check_fits(prompt_len, limit)      # ValueError: this request could never be held
    kv.admit(req)                         # False: wait (no row, or no blocks under the budget)
    kv.reuse(req)                         # copy the longest stored prefix in; req.fed moves on
    io = kv.binding(*kv.span(lo, hi))     # rows [lo, hi), or every row for device sessions
    kv.keep(req, before)                  # store the prefix blocks fed since `before`
    kv.release(req)
"""

from __future__ import annotations

from dataclasses import dataclass

from compiler.runtime.config import EngineConfig
from compiler.runtime.kv_memory import KVBlocks, resident_bytes
from compiler.runtime.prefix_cache import PrefixCache, block_keys
from compiler.runtime.request import Request
from compiler.runtime.rows import RowPool


@dataclass(frozen=True)
class KVUsage:
    """A snapshot for gauges and banners."""

    rows: int
    free_rows: int
    block_tokens: int | None = None  # None: no block budget (device rows)
    blocks_used: int = 0
    blocks_free: int | None = None
    budget_gib: float | None = None
    budget_tokens: int | None = None
    prefix_tokens: int = 0  # tokens the prefix pool holds at most (0: off)
    prefix_blocks_used: int = 0
    prefix_hit_rate: float = 0.0


class KVManager:
    def __init__(self, session, cfg: EngineConfig, rows: int, kv_cache_gib: float | None = None,
                 prefix_tokens: int = 0, block_size: int = 16):
        caps = session.capabilities
        self.session = session
        self.rows = RowPool(session, rows)
        self.blocks = KVBlocks.for_budget(cfg.kv_cache, kv_cache_gib) if caps.sliceable else None
        self.block_size = block_size
        self.prefix = None
        if prefix_tokens and caps.paged and caps.sliceable:
            arrays = session.kv_arrays(self.rows.cache)  # [rows, kv_heads, max_seq, head_dim (or 1: scales)] each
            self.prefix = PrefixCache([(a.shape[1], a.shape[3], a.dtype) for a in arrays], block_size,
                                      max(prefix_tokens // block_size, 1))

    # -- admission -------------------------------------------------------------------------------
    def check_fits(self, prompt_len: int, limit: int) -> None:
        """Refuse a request the budget could never hold (it would wait forever)."""
        b = self.blocks
        if b is not None and not b.fits_ever(prompt_len + limit):
            raise ValueError(f"this request needs KV for {prompt_len + limit} tokens ({prompt_len} prompt + {limit} new) "
                             f"but the KV budget of {b.budget_gib} GiB holds {b.capacity * b.block_tokens}; "
                             f"raise --kv-cache-gib or lower max_tokens")

    @property
    def free_rows(self) -> int:
        return self.rows.free

    def admit(self, req: Request) -> bool:
        """A row and the blocks of req's prompt and limit, or False (nothing taken)."""
        if not self.rows.free:
            return False
        if self.blocks is not None and not self.blocks.reserve(req.id, req.prompt_len + req.limit):
            return False
        req.row = self.rows.acquire()
        return True

    def release(self, req: Request) -> None:
        if self.blocks is not None:
            self.blocks.release(req.id)
        if req.row is not None:
            self.rows.release(req.row)
            req.row = None

    # -- prefix reuse ----------------------------------------------------------------------------
    def reuse(self, req: Request) -> None:
        """Before a prompt chunk: copy in whatever longer stored prefix of it there is now
        (another request may have computed it since this one was admitted)."""
        if self.prefix is None or req.fed % self.block_size:
            return
        blocks = self.prefix.match(req.tokens[: req.prompt_len])
        first = req.fed // self.block_size
        if len(blocks) > first:
            req.fed = self.prefix.load(blocks, self.session.kv_arrays(self.rows.cache), req.row, first)
            req.pending = req.tokens[req.fed: req.prompt_len]

    def completes(self, req: Request, upto: int) -> list[bytes]:
        """Keys of the prefix blocks req completes while its row grows from req.fed to upto tokens
        ([] without prefix reuse): two chunks completing the same block wait for one another."""
        if self.prefix is None:
            return []
        return block_keys(req.tokens, self.block_size, min(upto, req.prompt_len - 1))[req.fed // self.block_size:]

    def looked_up(self, req: Request) -> None:
        """Its first chunk is scheduled: count the prompt and what reuse saved of it."""
        if self.prefix is not None:
            self.prefix.count(req.prompt_len, req.fed)

    def keep(self, req: Request, before: int) -> None:
        """req's row grew from `before` to req.fed tokens: store any prefix block it completed."""
        if self.prefix is not None and req.fed // self.block_size > before // self.block_size:
            self.prefix.store(req.tokens, req.fed, self.session.kv_arrays(self.rows.cache), req.row)

    # -- calls -----------------------------------------------------------------------------------
    def span(self, lo: int, hi: int) -> tuple[int, int]:
        return self.rows.span(lo, hi)

    def binding(self, lo: int, hi: int):
        return self.rows.binding(lo, hi)

    # -- observing -------------------------------------------------------------------------------
    def usage(self) -> KVUsage:
        b, p = self.blocks, self.prefix
        base = KVUsage(self.rows.rows, self.rows.free)
        if b is None:
            return base
        return KVUsage(base.rows, base.free_rows, b.block_tokens, b.used, b.free, b.budget_gib, b.capacity * b.block_tokens,
                       p.num_blocks * p.block_size if p else 0, p.used_blocks if p else 0, p.hit_rate if p else 0.0)

    def resident_bytes(self) -> int:
        """KV memory the OS holds for the rows now (host rows; 0 for device rows)."""
        if not self.session.capabilities.paged:
            return 0
        return resident_bytes(self.session.kv_arrays(self.rows.cache))
