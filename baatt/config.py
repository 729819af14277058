"""Frozen, validated configuration of BA-Att and of every selector.

One dataclass drives the whole pipeline (SPEC.md sections 4-6): block sizes,
the budget rule (a sparsity ratio or a cumulative-mass threshold ``tau``), the
norm-sorting and compensation switches, and the always-kept blocks. It is
hashable, so it can be a static argument of ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

SELECTORS = (
    "baatt",
    "meanpool",
    "oracle",
    "xattention",
    "last_query",
    "sparge_like",
    "random",
    "dense",
)

Selector = Literal[
    "baatt", "meanpool", "oracle", "xattention", "last_query", "sparge_like", "random", "dense"
]


def _fail(field: str, rule: str, value) -> None:
    raise ValueError(f"BAConfig.{field} {rule}; got {value!r}")


@dataclasses.dataclass(frozen=True)
class BAConfig:
    """Configuration of block approximate sparse attention.

    Budget: give exactly one of ``sparsity`` (keep ``ceil((1 - sparsity) * N)``
    key blocks per query block) or ``tau`` (keep the fewest blocks whose softmax
    mass reaches ``tau``, clamped to ``[min_blocks, max_blocks]``). With
    neither, every block is kept (dense, through the same pipeline).

    Attributes:
      block_size: query block size (and key block size unless ``block_size_k``).
      block_size_k: key block size; defaults to ``block_size``.
      sparsity: fraction of key blocks skipped, in [0, 1).
      tau: cumulative-mass threshold in (0, 1].
      min_blocks / max_blocks: clamps on the number of kept blocks under ``tau``
        (``max_blocks`` also fixes the static width ``kmax`` of the selection).
      sort_q / sort_k: norm sorting of queries / keys+values (SPEC.md section 4).
      compensate: add ``beta * Delta`` (SPEC.md section 5).
      beta: compensation weight (1 as reported; 1/2 from the log-normal argument).
      count_correction: add ``log(valid keys in block)`` to the scores [ours].
      force_sink: always keep the key block(s) holding ``sink_positions``.
      sink_positions: token positions whose blocks are forced when ``force_sink``.
      local_window: always keep the key blocks within this many blocks of each
        query block's positional diagonal (0 = off). Positional, so it needs
        ``sort_q=False`` and ``sort_k=False``.
      selector: which block selector produces the selection (SPEC.md section 9).
      xattn_stride: anti-diagonal stride of the XAttention selector.
      last_query_size: queries used by the ``last_query`` selector.
      last_query_gamma: mass the vertical and slash lines must cover.
      sparge_sim_threshold: self-similarity below which a block is not ranked.
      seed: seed of the ``random`` selector.
    """

    block_size: int = 128
    block_size_k: int | None = None
    sparsity: float | None = None
    tau: float | None = None
    min_blocks: int = 1
    max_blocks: int | None = None
    sort_q: bool = False
    sort_k: bool = False
    compensate: bool = False
    beta: float = 1.0
    count_correction: bool = True
    force_sink: bool = False
    sink_positions: tuple[int, ...] = (0,)
    local_window: int = 0
    selector: Selector = "baatt"
    xattn_stride: int = 8
    last_query_size: int = 64
    last_query_gamma: float = 0.9
    sparge_sim_threshold: float = 0.5
    seed: int = 0

    def __post_init__(self):
        for name in ("block_size", "block_size_k"):
            value = getattr(self, name)
            if value is None and name == "block_size_k":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                _fail(name, "must be a positive int", value)
            if value & (value - 1) or value < 8:
                _fail(name, "must be a power of two >= 8", value)
        if self.sparsity is not None and self.tau is not None:
            _fail("sparsity", "and tau are exclusive: give one budget rule", (self.sparsity, self.tau))
        if self.sparsity is not None:
            s = self.sparsity
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or not 0.0 <= s < 1.0:
                _fail("sparsity", "must be a finite number in [0, 1)", s)
        if self.tau is not None:
            t = self.tau
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not 0.0 < t <= 1.0:
                _fail("tau", "must be a finite number in (0, 1]", t)
        if not isinstance(self.min_blocks, int) or self.min_blocks < 1:
            _fail("min_blocks", "must be an int >= 1", self.min_blocks)
        if self.max_blocks is not None:
            if not isinstance(self.max_blocks, int) or self.max_blocks < self.min_blocks:
                _fail("max_blocks", "must be an int >= min_blocks", self.max_blocks)
        if not isinstance(self.beta, (int, float)) or not math.isfinite(self.beta):
            _fail("beta", "must be a finite number", self.beta)
        for name in ("sort_q", "sort_k", "compensate", "count_correction", "force_sink"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, "must be a bool", getattr(self, name))
        if not isinstance(self.sink_positions, tuple) or not self.sink_positions or any(
            not isinstance(p, int) or p < 0 for p in self.sink_positions
        ):
            _fail("sink_positions", "must be a non-empty tuple of ints >= 0", self.sink_positions)
        if not isinstance(self.local_window, int) or self.local_window < 0:
            _fail("local_window", "must be an int >= 0", self.local_window)
        if self.local_window and (self.sort_q or self.sort_k):
            _fail(
                "local_window",
                "is positional and needs sort_q=False and sort_k=False (sorting scatters positions)",
                self.local_window,
            )
        if self.selector not in SELECTORS:
            _fail("selector", f"must be one of {SELECTORS}", self.selector)
        if not isinstance(self.xattn_stride, int) or self.xattn_stride < 1:
            _fail("xattn_stride", "must be an int >= 1", self.xattn_stride)
        if self.xattn_stride > self.block_q or self.block_q % self.xattn_stride:
            _fail("xattn_stride", f"must divide block_size ({self.block_q})", self.xattn_stride)
        if not isinstance(self.last_query_size, int) or self.last_query_size < 1:
            _fail("last_query_size", "must be an int >= 1", self.last_query_size)
        if not 0.0 < self.last_query_gamma <= 1.0:
            _fail("last_query_gamma", "must be in (0, 1]", self.last_query_gamma)
        if not -1.0 <= self.sparge_sim_threshold <= 1.0:
            _fail("sparge_sim_threshold", "must be in [-1, 1]", self.sparge_sim_threshold)

    # -- derived -----------------------------------------------------------------

    @property
    def block_q(self) -> int:
        return self.block_size

    @property
    def block_k(self) -> int:
        return self.block_size if self.block_size_k is None else self.block_size_k

    def num_blocks(self, length_q: int, length_k: int) -> tuple[int, int]:
        """(Nq, Nk) = (ceil(Lq / block_q), ceil(Lk / block_k))."""
        return -(-length_q // self.block_q), -(-length_k // self.block_k)

    def kmax(self, num_k_blocks: int) -> int:
        """Static width of the selection list for ``num_k_blocks`` key blocks.

        Sparsity budget: ``kappa = ceil((1 - sparsity) * N)`` (SPEC.md section 6),
        widened to fit the forced blocks. ``tau`` budget: ``max_blocks`` or N.
        """
        n = num_k_blocks
        if self.sparsity is not None:
            # Round before ceil so that 0.5 * 10 does not become 6 through float error.
            k = math.ceil(round((1.0 - self.sparsity) * n, 9))
        elif self.tau is not None:
            k = n if self.max_blocks is None else self.max_blocks
        else:
            k = n
        k = max(k, self.max_forced_blocks())
        return max(1, min(k, n))

    def max_forced_blocks(self) -> int:
        forced = 0
        if self.force_sink:
            forced += len(set(self.sink_positions))
        if self.local_window:
            forced += 2 * self.local_window + 1
        return forced

    def replace(self, **changes) -> "BAConfig":
        return dataclasses.replace(self, **changes)
