"""Frozen, validated configuration of BA-Att and of every selector.

One dataclass drives the whole pipeline (docs/spec.md sections 4-6): block sizes,
the budget rule (a sparsity ratio or a cumulative-mass threshold ``tau``), the
norm-sorting and compensation switches, the always-kept blocks, and which
registered selector makes the selection with which parameters. It is hashable,
so it can be a static argument of ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from collections.abc import Hashable

from baatt.attention_mask import BIDIRECTIONAL, AttentionMask
from baatt.selector_registry import SELECTORS, SWITCHES, SelectorParamError, get_selector

# Estimates of the dropped key blocks (BAConfig.tail): none, or one pooled key and value per block or group.
TAIL_MODES = ("none", "pooled")

# The built-in selectors' parameters as plain BAConfig keywords, kept from before
# ``selector_params`` existed: keyword -> (selector, field of that selector's params).
SELECTOR_KEYWORDS = {
    "xattn_stride": ("xattention", "stride"),
    "last_query_size": ("last_query", "size"),
    "last_query_gamma": ("last_query", "gamma"),
    "sparge_sim_threshold": ("sparge_like", "sim_threshold"),
    "seed": ("random", "seed"),
}


def _fail(field: str, rule: str, value) -> None:
    raise ValueError(f"BAConfig.{field} {rule}; got {value!r}")


def check_switches(config: BAConfig, selector: str) -> None:
    """Refuse a switch of ``SWITCHES`` (sorting, clustering, compensation) that ``selector`` would ignore."""
    honoured = get_selector(selector).switches
    for name in SWITCHES:
        if getattr(config, name) is True and name not in honoured:
            rule = ", ".join(n for n in SWITCHES if n in honoured) or "none of " + ", ".join(SWITCHES)
            _fail(name, f"is not applied by selector {selector!r} (it applies {rule}): set it False or pick a "
                  "selector that applies it", True)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# The annotated types a selector's params field is checked against, with the rule each states.
_PARAM_TYPE_RULES = {
    int: (_is_int, "must be an int"),
    float: (_is_number, "must be a number"),
    bool: (lambda value: isinstance(value, bool), "must be a bool"),
    str: (lambda value: isinstance(value, str), "must be a str"),
}


def _param_type_rule(params_type: type, field: str, value) -> str | None:
    """The rule ``value`` breaks for ``field`` of a selector's params dataclass, by its annotation, or None.

    A value of the wrong type would otherwise reach a traced selector and fail there
    with a tracer error (``seed=1.5`` in ``jax.random.key``). Fields annotated with
    other types than int, float, bool and str are left to the params' own checks.
    """
    try:
        annotation = typing.get_type_hints(params_type).get(field)
    except NameError:  # an annotation naming what its module does not define at run time
        return None
    check, rule = _PARAM_TYPE_RULES.get(annotation, (None, None))
    return None if check is None or check(value) else rule


@dataclasses.dataclass(frozen=True)
class BAConfig:
    """Configuration of block approximate sparse attention.

    Budget: give at most one of ``sparsity`` (keep ``ceil((1 - sparsity) * N)``
    key blocks per query block), ``tau`` (keep the fewest blocks whose softmax
    mass reaches ``tau``) or ``peak_margin`` (keep the blocks whose mass is
    within ``exp(-peak_margin)`` of the row's largest); the last two are clamped
    to ``[min_blocks, max_blocks]``. With none, every block is kept (dense,
    through the same pipeline).

    Attributes:
      block_size: query block size (and key block size unless ``block_size_k``).
      block_size_k: key block size; defaults to ``block_size``.
      sparsity: fraction of key blocks skipped, in [0, 1).
      tau: cumulative-mass threshold in (0, 1].
      peak_margin: peak-relative rule, a margin >= 0 in log mass (nats): keep key
        block ``b`` when ``log mass_b >= max_b' log mass_b' - peak_margin``.
      min_blocks / max_blocks: clamps on the number of kept blocks under ``tau`` and
        ``peak_margin`` (``max_blocks`` also fixes the static width ``kmax`` of the selection).
      sort_q / sort_k: norm sorting of queries / keys+values (docs/spec.md section 4).
      compensate: add ``beta * Delta`` (docs/spec.md section 5).
      beta: compensation weight (1 as reported; 1/2 from the log-normal argument).
      count_correction: add ``log(valid keys in block)`` to the scores [ours].
      force_sink: always keep the key block(s) holding ``sink_positions``.
      sink_positions: token positions whose blocks are forced when ``force_sink``.
      local_window: always keep the key blocks within this many blocks of each
        query block's positional diagonal (0 = off). Positional, so it needs
        ``sort_q=False`` and ``sort_k=False``.
      selector: name of the registered selector that makes the selection
        (docs/spec.md section 9); ``baatt.SELECTORS`` lists them.
      selector_params: the parameters of ``selector``, an instance of its own frozen
        params dataclass (``baatt.SELECTORS[name].params``), or None for the
        keywords below / its defaults.
      xattn_stride: anti-diagonal stride of the XAttention selector.
      last_query_size: queries used by the ``last_query`` selector.
      last_query_gamma: mass the vertical and slash lines must cover.
      sparge_sim_threshold: self-similarity below which a block is not ranked.
      seed: seed of the ``random`` selector.
      mask: who attends to whom (``baatt.AttentionMask``; "bidirectional" and
        "causal" may be given by name). Under a causal or block-causal mask only
        the block pairs the mask allows are candidates, the budget is a fraction
        of those per query block, and a token-causal mask always keeps the
        blocks on the diagonal. Such a mask is positional, so it needs
        ``sort_q=False`` and ``sort_k=False``; a block-causal one needs its
        ``generation_block`` to be a multiple of both block sizes.
      tail: "none", or "pooled": each query also gets a pooled estimate of the key
        blocks its query block drops, one mean key and value per block (or per
        ``tail_group`` tokens) weighted by its count of real keys
        (``baatt.reference.tail``). Runs after the sparse operator of every implementation.
      tail_group: tokens per pooled key, a power of two dividing the key block
        (None: one per key block). tail_refine: with ``tail_group``, pool in groups
        only this many highest-scoring dropped blocks per query block, the others in
        one key each (0: all in groups). tail_temperature: multiplies the pooled
        logits; a number or one per query head. All three need ``tail="pooled"``.
      cluster_q / cluster_k: order queries / keys+values into blocks by balanced k-means
        on their directions (``baatt.selection.cluster``) instead of by position: equal-size
        clusters, so blocks of similar tokens; exclusive with ``sort_q`` / ``sort_k`` and,
        being a permutation, with causal masks and ``local_window``. cluster_iters: its
        Lloyd iterations.
      guard_recall: None (off), or a recall in (0, 1]: per head, the exact softmax of one
        sampled query block checks the selection, and a head whose block keeps less than
        this share of its mass attends to every block (``baatt.selection.guard``; what it
        cost and where it fired are in ``AttentionStats.guard``).

    Selector parameters: each selector owns a small frozen dataclass of its
    parameters (``XAttentionParams``, ``LastQueryParams``, ``SpargeParams``,
    ``RandomParams``, or a user selector's own), and ``params_for(name)`` returns
    the one a selector runs with. The five plain keywords above predate
    ``selector_params`` and stay valid: each sets one field of a built-in
    selector's params (``SELECTOR_KEYWORDS``), so
    ``BAConfig(selector="xattention", xattn_stride=4)`` and
    ``BAConfig(selector="xattention", selector_params=XAttentionParams(stride=4))``
    are the same selection. The keywords are validated whatever the selector; a
    keyword moved off its default beside ``selector_params`` for the same selector
    is refused. Being frozen, the params are hashable and the config stays a
    static argument of ``jax.jit``.
    """

    block_size: int = 128
    block_size_k: int | None = None
    sparsity: float | None = None
    tau: float | None = None
    peak_margin: float | None = None
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
    selector: str = "baatt"
    selector_params: Hashable | None = None
    xattn_stride: int = 8
    last_query_size: int = 64
    last_query_gamma: float = 0.9
    sparge_sim_threshold: float = 0.5
    seed: int = 0
    mask: AttentionMask = BIDIRECTIONAL
    tail: str = "none"
    tail_group: int | None = None
    tail_refine: int = 0
    tail_temperature: float | tuple[float, ...] = 1.0
    cluster_q: bool = False
    cluster_k: bool = False
    cluster_iters: int = 4
    guard_recall: float | None = None

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
        if self.peak_margin is not None and (self.sparsity is not None or self.tau is not None):
            _fail("peak_margin", "excludes sparsity and tau: give one budget rule",
                  (self.peak_margin, self.sparsity, self.tau))
        if self.sparsity is not None:
            s = self.sparsity
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or not 0.0 <= s < 1.0:
                _fail("sparsity", "must be a finite number in [0, 1)", s)
        if self.tau is not None:
            t = self.tau
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not 0.0 < t <= 1.0:
                _fail("tau", "must be a finite number in (0, 1]", t)
        if self.peak_margin is not None:
            m = self.peak_margin
            if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m) or m < 0:
                _fail("peak_margin", "must be a finite number >= 0", m)
        if not _is_int(self.min_blocks) or self.min_blocks < 1:
            _fail("min_blocks", "must be an int >= 1", self.min_blocks)
        if self.max_blocks is not None:
            if not _is_int(self.max_blocks) or self.max_blocks < self.min_blocks:
                _fail("max_blocks", "must be an int >= min_blocks", self.max_blocks)
        if not _is_number(self.beta) or not math.isfinite(self.beta):
            _fail("beta", "must be a finite number", self.beta)
        for name in ("sort_q", "sort_k", "compensate", "count_correction", "force_sink"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, "must be a bool", getattr(self, name))
        if not isinstance(self.sink_positions, tuple) or not self.sink_positions or any(
            not _is_int(p) or p < 0 for p in self.sink_positions
        ):
            _fail("sink_positions", "must be a non-empty tuple of ints >= 0", self.sink_positions)
        if not _is_int(self.local_window) or self.local_window < 0:
            _fail("local_window", "must be an int >= 0", self.local_window)
        if self.local_window and (self.sort_q or self.sort_k):
            _fail(
                "local_window",
                "is positional and needs sort_q=False and sort_k=False (sorting scatters positions)",
                self.local_window,
            )
        self._check_mask()
        self._check_tail()
        self._check_cluster_and_guard()
        if not isinstance(self.selector, str) or self.selector not in SELECTORS:
            _fail("selector", f"must be one of {tuple(SELECTORS)}", self.selector)
        check_switches(self, self.selector)
        self._check_selector_keywords()
        if self.selector_params is not None:
            self._check_selector_params()

    def _check_tail(self) -> None:
        if self.tail not in TAIL_MODES:
            _fail("tail", f"must be one of {TAIL_MODES}", self.tail)
        group = self.tail_group
        if group is not None and (not _is_int(group) or group < 1 or group & (group - 1) or self.block_k % group):
            _fail("tail_group", f"must be None or a power of two dividing the key block size ({self.block_k})", group)
        if not _is_int(self.tail_refine) or self.tail_refine < 0:
            _fail("tail_refine", "must be an int >= 0", self.tail_refine)
        if self.tail_refine and (group is None or group == self.block_k):
            _fail("tail_refine", f"needs a tail_group smaller than the key block size ({self.block_k})",
                  self.tail_refine)
        t = self.tail_temperature
        values = t if isinstance(t, tuple) else (t,)
        if not values or any(not _is_number(x) or not math.isfinite(x) or x <= 0 for x in values):
            _fail("tail_temperature", "must be a finite number > 0 or a non-empty tuple of them (one per query head)",
                  t)
        if self.tail == "none":
            for name, default in (("tail_group", None), ("tail_refine", 0), ("tail_temperature", 1.0)):
                if getattr(self, name) != default:
                    _fail(name, "applies to tail='pooled' only", getattr(self, name))

    def _check_cluster_and_guard(self) -> None:
        for name in ("cluster_q", "cluster_k"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, "must be a bool", getattr(self, name))
        for cluster, sort in (("cluster_q", "sort_q"), ("cluster_k", "sort_k")):
            if getattr(self, cluster) and getattr(self, sort):
                _fail(cluster, f"and {sort} both order the tokens into blocks: give one", True)
            if getattr(self, cluster) and self.local_window:
                _fail(cluster, "needs local_window=0 (clustering scatters positions)", True)
        if not _is_int(self.cluster_iters) or self.cluster_iters < 1:
            _fail("cluster_iters", "must be an int >= 1", self.cluster_iters)
        g = self.guard_recall
        if g is not None and (not _is_number(g) or not 0.0 < g <= 1.0):
            _fail("guard_recall", "must be None or a number in (0, 1]", g)

    def _check_mask(self) -> None:
        if self.mask in ("bidirectional", "causal"):
            object.__setattr__(self, "mask", AttentionMask(self.mask))
        if not isinstance(self.mask, AttentionMask):
            _fail("mask", "must be a baatt.AttentionMask (or 'bidirectional' / 'causal')", self.mask)
        if self.mask.is_bidirectional:
            return
        for name in ("sort_q", "sort_k", "cluster_q", "cluster_k"):
            if getattr(self, name) is True:
                _fail(name, f"must be False under a {self.mask.kind} mask (sorting and clustering scatter the "
                      "positions the mask is defined on)", True)
        if rule := self.mask.block_size_rule(self.block_q, self.block_k):
            _fail("mask", rule, self.mask)

    def _check_selector_keywords(self) -> None:
        """Each built-in selector's params, built from the plain keywords, must pass that selector's rules."""
        for keyword, (owner, field) in SELECTOR_KEYWORDS.items():
            value = getattr(self, keyword)
            if rule := _param_type_rule(get_selector(owner).params, field, value):
                _fail(keyword, rule, value)
        for name in dict.fromkeys(owner for owner, _ in SELECTOR_KEYWORDS.values()):
            try:
                self._params_from_keywords(name)
            except SelectorParamError as err:
                keyword = next(kw for kw, (owner, field) in SELECTOR_KEYWORDS.items()
                               if (owner, field) == (name, err.field))
                _fail(keyword, err.rule, err.value)
        if self.xattn_stride > self.block_q or self.block_q % self.xattn_stride:
            _fail("xattn_stride", f"must divide block_size ({self.block_q})", self.xattn_stride)

    def _check_selector_params(self) -> None:
        params_type = SELECTORS[self.selector].params
        if params_type is None:
            _fail("selector_params", f"must be None: selector {self.selector!r} takes no parameters",
                  self.selector_params)
        if not isinstance(self.selector_params, params_type):
            _fail("selector_params", f"must be an instance of {params_type.__name__} (the parameters of selector "
                  f"{self.selector!r})", self.selector_params)
        for field in dataclasses.fields(self.selector_params):
            value = getattr(self.selector_params, field.name)
            if rule := _param_type_rule(params_type, field.name, value):
                _fail("selector_params", f"field {field.name} of {params_type.__name__} {rule}", value)
        try:
            hash(self.selector_params)
        except TypeError:
            _fail("selector_params", "must be hashable (a frozen dataclass): BAConfig is a static argument of "
                  "jax.jit", self.selector_params)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for keyword, (owner, _) in SELECTOR_KEYWORDS.items():
            if owner == self.selector and getattr(self, keyword) != defaults[keyword]:
                _fail(keyword, f"and selector_params both set parameters of selector {self.selector!r}: "
                      "give one", getattr(self, keyword))

    def _params_from_keywords(self, selector: str):
        values = {field: getattr(self, kw) for kw, (owner, field) in SELECTOR_KEYWORDS.items() if owner == selector}
        return get_selector(selector).params(**values)

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

        Sparsity budget: ``kappa = ceil((1 - sparsity) * N)`` (docs/spec.md section 6),
        widened to fit the forced blocks. ``tau`` and ``peak_margin``: ``max_blocks`` or N.
        """
        n = num_k_blocks
        if self.sparsity is not None:
            # Round before ceil so that 0.5 * 10 does not become 6 through float error.
            k = math.ceil(round((1.0 - self.sparsity) * n, 9))
        elif self.tau is not None or self.peak_margin is not None:
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
        if self.mask.kind == "causal":  # the key blocks on the diagonal of a query block
            forced += max(1, self.block_q // self.block_k)
        return forced

    def params_for(self, selector: str | None = None) -> Hashable | None:
        """The parameters ``selector`` (default: this config's) runs with: its params dataclass, or None.

        ``selector_params`` when it is given for that selector; otherwise, for a built-in
        selector, the plain keywords; otherwise the params dataclass's defaults.
        """
        name = self.selector if selector is None else selector
        params_type = get_selector(name).params
        if params_type is None:
            return None
        if name == self.selector and self.selector_params is not None:
            return self.selector_params
        if any(owner == name for owner, _ in SELECTOR_KEYWORDS.values()):
            return self._params_from_keywords(name)
        return params_type()

    def replace(self, **changes) -> BAConfig:
        return dataclasses.replace(self, **changes)
