"""The selector registry: a selector added in one file (``tests/toy_selector.py``) runs wherever a
built-in one does, its parameters reach it, and an unknown name is refused with the registered ones."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import baatt
from baatt.selection import XAttentionParams, block_map, register_selector, select_blocks
from baatt.selector_registry import SWITCHES
from tests import bruteforce as bf
from tests import toy_selector

BUILT_IN = ["baatt", "meanpool", "oracle", "xattention", "last_query", "sparge_like", "random", "dense"]


def _qkv(seed=0, length=128):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, length, 2, 16))
    k = rng.standard_normal((2, length, 1, 16))
    v = rng.standard_normal((2, length, 1, 16))
    return (jnp.asarray(x, jnp.float32) for x in (q, k, v))


def test_registry_lists_built_ins_then_the_toy():
    assert list(baatt.SELECTORS)[: len(BUILT_IN)] == BUILT_IN
    assert baatt.SELECTORS["every_other"].params is toy_selector.EveryOtherParams
    assert baatt.SELECTORS["xattention"].params is XAttentionParams


@pytest.mark.parametrize("parity", [None, 0, 1])
def test_toy_selector_through_attention_and_block_map(parity):
    q, k, v = _qkv()
    params = None if parity is None else toy_selector.EveryOtherParams(parity)
    cfg = baatt.BAConfig(block_size=16, sparsity=0.5, selector="every_other", selector_params=params)
    out, stats = baatt.attention(q, k, v, config=cfg, return_stats=True)
    sel = stats["selection"]
    kept = np.arange(parity or 0, 8, 2)  # 8 key blocks, sparsity 0.5: the 4 of that parity
    np.testing.assert_array_equal(sel.indices, np.broadcast_to(kept, (2, 2, 8, 4)))
    np.testing.assert_array_equal(sel.counts, 4)
    want, _ = bf.block_sparse(np.asarray(q), np.asarray(k), np.asarray(v), np.asarray(sel.indices),
                              np.asarray(sel.counts), 16, 16)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(select_blocks(q, k, cfg).indices, sel.indices)
    m = np.asarray(block_map(q, k, cfg))
    np.testing.assert_allclose(m, np.broadcast_to(np.isin(np.arange(8), kept) / 4, m.shape), rtol=1e-6)


def test_unknown_selector_raises_naming_the_registered_ones():
    q, k, _ = _qkv()
    rule = r"selector must be one of \('baatt', .*'every_other'\); got 'magic'"
    with pytest.raises(ValueError, match=r"BAConfig\." + rule):
        baatt.BAConfig(selector="magic")
    with pytest.raises(ValueError, match=rule):
        select_blocks(q, k, baatt.BAConfig(), selector="magic")
    with pytest.raises(ValueError, match=rule):
        block_map(q, k, baatt.BAConfig(), selector="magic")


def test_keywords_and_selector_params_are_one_selection():
    q, k, _ = _qkv(1)
    by_keyword = baatt.BAConfig(block_size=16, sparsity=0.5, selector="xattention", xattn_stride=4)
    by_params = baatt.BAConfig(block_size=16, sparsity=0.5, selector="xattention",
                               selector_params=XAttentionParams(stride=4))
    assert by_keyword.params_for() == by_params.params_for() == XAttentionParams(stride=4)
    assert baatt.BAConfig(last_query_gamma=0.5).params_for("last_query").gamma == 0.5
    assert by_params.params_for("baatt") is None
    assert isinstance(hash(by_params), int)  # a static argument of jax.jit
    np.testing.assert_array_equal(select_blocks(q, k, by_keyword).indices, select_blocks(q, k, by_params).indices)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(selector="xattention", selector_params=toy_selector.EveryOtherParams()),
         r"BAConfig\.selector_params must be an instance of XAttentionParams \(the parameters of selector 'xattention'\)"),
        (dict(selector_params=XAttentionParams()), "BAConfig.selector_params must be None: selector 'baatt' takes no"),
        (dict(selector="xattention", xattn_stride=4, selector_params=XAttentionParams(stride=4)),
         "BAConfig.xattn_stride and selector_params both set parameters of selector 'xattention'"),
        (dict(last_query_size=0), "BAConfig.last_query_size must be an int >= 1; got 0"),
        (dict(sparge_sim_threshold=2.0), r"BAConfig.sparge_sim_threshold must be in \[-1, 1\]; got 2.0"),
    ],
)
def test_bad_selector_parameters_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        baatt.BAConfig(**kwargs)


def test_params_check_their_own_fields():
    with pytest.raises(ValueError, match=r"EveryOtherParams.parity must be 0 or 1; got 2"):
        toy_selector.EveryOtherParams(parity=2)
    with pytest.raises(ValueError, match=r"XAttentionParams.stride must be an int >= 1; got 0"):
        XAttentionParams(stride=0)


def test_register_refuses_a_taken_name_and_bad_arguments():
    with pytest.raises(ValueError, match="selector 'baatt' is already registered"):
        register_selector("baatt", select=toy_selector.select, block_map=toy_selector.block_map)
    with pytest.raises(ValueError, match="params of selector 'loose' must be a dataclass type or None"):
        register_selector("loose", select=toy_selector.select, block_map=toy_selector.block_map, params=dict)
    with pytest.raises(ValueError, match="block_map of selector 'loose' must be callable"):
        register_selector("loose", select=toy_selector.select, block_map=None)
    assert "loose" not in baatt.SELECTORS


def test_every_switch_is_applied_or_refused_never_ignored():
    """Sorting, clustering and compensation: a selector that honours one orders its blocks by it (the selection
    carries the permutation) or selects the same either way; any other selector is refused by name, in
    BAConfig and in a select_blocks / block_map override, and a user's selector declares what it honours."""
    q, k, v = _qkv(length=128)
    for name, selector in baatt.SELECTORS.items():
        for switch in SWITCHES:
            changes = {switch: True, **(dict(cluster_iters=1) if switch.startswith("cluster") else {})}
            if switch not in selector.switches:
                rule = rf"BAConfig\.{switch} is not applied by selector '{name}'"
                with pytest.raises(ValueError, match=rule):
                    baatt.BAConfig(block_size=16, sparsity=0.5, selector=name, **changes)
                with pytest.raises(ValueError, match=rule):
                    select_blocks(q, k, baatt.BAConfig(block_size=16, sparsity=0.5, **changes), selector=name)
                with pytest.raises(ValueError, match=rule):
                    block_map(q, k, baatt.BAConfig(block_size=16, **changes), selector=name)
                continue
            if name in ("dense", "prompt_gen") or switch == "compensate":
                continue  # checked below (dense) and in test_diffusion (prompt_gen); compensation keeps positions
            sel = select_blocks(q, k, baatt.BAConfig(block_size=16, sparsity=0.5, selector=name, **changes))
            ordered = sel.q_perm if switch.endswith("_q") else sel.k_perm
            assert ordered is not None, (name, switch)
    assert baatt.SELECTORS["every_other"].switches == frozenset()  # the toy declares none
    assert {n for n, s in baatt.SELECTORS.items() if "cluster_q" in s.switches} >= {
        "baatt", "meanpool", "oracle", "max_oracle", "pooled_query"}
    # Every block kept: dense attention in any order.
    dense = jnp.asarray(jax.nn.dot_product_attention(q, k, v))
    for changes in (dict(sort_q=True, sort_k=True), dict(cluster_q=True, cluster_k=True), dict(compensate=True)):
        out = baatt.attention(q, k, v, config=baatt.BAConfig(block_size=16, selector="dense", **changes))
        np.testing.assert_allclose(out, dense, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="switches of selector 'loose' must be a collection of names from"):
        register_selector("loose", select=toy_selector.select, block_map=toy_selector.block_map, switches="sort_q")
    with pytest.raises(ValueError, match="switches of selector 'loose' must be a collection of names from"):
        register_selector("loose", select=toy_selector.select, block_map=toy_selector.block_map,
                          switches=("sort_v",))
