"""The host and device draws of the synthetic attention inputs follow one generative model."""

import numpy as np
import pytest

from baatt import synthetic


@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (4, 2)])
def test_device_draw_matches_host_draw_in_distribution(q_heads, kv_heads):
    cfg = synthetic.SyntheticConfig(length=1024, q_heads=q_heads, kv_heads=kv_heads, head_dim=32, seed=3)
    host = [np.asarray(x) for x in synthetic.attention_inputs(cfg)]
    device = [np.asarray(x) for x in synthetic.attention_inputs_on_device(cfg)]
    for h, d in zip(host, device, strict=True):
        assert h.shape == d.shape and np.all(np.isfinite(d))
        # Same scale of entries and of token norms (the heavy tail sorting reacts to).
        np.testing.assert_allclose(d.std(), h.std(), rtol=0.15)
        hn, dn = np.linalg.norm(h, axis=-1), np.linalg.norm(d, axis=-1)
        np.testing.assert_allclose(np.percentile(dn, [10, 50, 90]), np.percentile(hn, [10, 50, 90]), rtol=0.2)
    # A local band: neighbouring keys are far more similar than distant ones.
    k = device[1][0, :, 0]
    near = np.mean(np.sum(k[1:] * k[:-1], -1))
    far = np.mean(np.sum(k[600:] * k[:-600], -1))
    assert near > 3 * abs(far)
