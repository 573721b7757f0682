"""The per-backend kernels of models/layers.py compute the same thing whichever is chosen: the depthwise
conv against flax's grouped nn.Conv, attention's einsum form against jax.nn.dot_product_attention."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wurst_jax.models import layers


@pytest.mark.parametrize('padding', ['VALID', ((1, 1), (2, 0))])
@pytest.mark.parametrize('kernel', ['shifted', 'grouped'])
def test_depthwise_conv_equals_grouped_nn_conv(monkeypatch, padding, kernel):
    monkeypatch.setattr(layers, 'depthwise_kernel', lambda: kernel)
    x = jax.random.normal(jax.random.key(1), (2, 7, 9, 6))
    reference = nn.Conv(6, (3, 3), padding=padding, feature_group_count=6)
    variables = reference.init(jax.random.key(0), x)
    variables['params']['bias'] = jnp.linspace(-1, 1, 6)
    ours = layers.DepthwiseConv(6, 3, padding)
    assert jax.tree.map(jnp.shape, nn.meta.unbox(ours.init(jax.random.key(0), x))) == jax.tree.map(jnp.shape, variables)

    def loss(module, v, x):
        return jnp.sum(jnp.sin(module.apply(v, x)))
    np.testing.assert_allclose(ours.apply(variables, x), reference.apply(variables, x), rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.grad(loss, argnums=(1, 2))(ours, variables, x),
                         jax.grad(loss, argnums=(1, 2))(reference, variables, x)):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, want)


def test_attention_kernels_agree(monkeypatch):
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    kv = jax.random.normal(jax.random.key(1), (2, 7, 12))
    mask = jnp.array([[1] * 7, [1] * 4 + [0] * 3])
    module = layers.Attention(16, 4)
    variables = module.init(jax.random.key(2), x, kv)
    outputs = {}
    for kernel in ('einsum', 'dot_product_attention'):
        monkeypatch.setattr(layers, 'attention_kernel', lambda kernel=kernel: kernel)
        outputs[kernel] = module.apply(variables, x, kv, mask=mask)
    np.testing.assert_allclose(outputs['einsum'], outputs['dot_product_attention'], rtol=1e-5, atol=1e-6)
    # The mask matters: the second sample's padded keys are ignored, its kept keys are not.
    changed = kv.at[1, 4:].add(3.0)
    np.testing.assert_allclose(module.apply(variables, x, changed, mask=mask)[1], outputs['einsum'][1], atol=1e-6)
    assert not np.allclose(module.apply(variables, x, changed)[1], outputs['einsum'][1], atol=1e-3)
