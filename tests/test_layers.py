"""The per-backend kernels of models/layers.py compute the same thing whichever is chosen: the depthwise
conv against flax's grouped nn.Conv, attention's einsum and blocked forms against jax.nn.dot_product_attention."""
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


@pytest.mark.parametrize('tile_bytes', [2 ** 22, 448])  # one block of queries; two of 8 rows, 2 padded
def test_attention_kernels_agree(monkeypatch, tile_bytes):
    x = jax.random.normal(jax.random.key(0), (2, 14, 16))
    kv = jax.random.normal(jax.random.key(1), (2, 7, 12))
    mask = jnp.array([[1] * 7, [1] * 4 + [0] * 3])
    module = layers.Attention(16, 4)
    variables = module.init(jax.random.key(2), x, kv)
    monkeypatch.setattr(layers, 'blocked_attention',
                        lambda *a, blocked=layers.blocked_attention: blocked(*a, tile_bytes=tile_bytes))

    def loss(variables, x, kv):
        return jnp.sum(jnp.sin(module.apply(variables, x, kv, mask=mask)))
    outputs, grads = {}, {}
    for kernel in ('einsum', 'blocked', 'dot_product_attention'):
        monkeypatch.setattr(layers, 'attention_kernel', lambda kernel=kernel: kernel)
        outputs[kernel] = module.apply(variables, x, kv, mask=mask)
        grads[kernel] = jax.grad(loss, argnums=(0, 1, 2))(variables, x, kv)
    for kernel in ('einsum', 'blocked'):
        np.testing.assert_allclose(outputs[kernel], outputs['dot_product_attention'], rtol=1e-5, atol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                     grads[kernel], grads['dot_product_attention'])
    # The mask matters: the second sample's padded keys are ignored, its kept keys are not.
    changed = kv.at[1, 4:].add(3.0)
    np.testing.assert_allclose(module.apply(variables, x, changed, mask=mask)[1], outputs['blocked'][1], atol=1e-6)
    assert not np.allclose(module.apply(variables, x, changed)[1], outputs['blocked'][1], atol=1e-3)


def test_blocked_attention_with_every_key_masked_matches_the_plain_form():
    """A row with no key to attend (a fully padded caption) averages all values, as the plain form does."""
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 5, 2, 4)) for i in range(3))
    mask = jnp.zeros((1, 5), bool)
    logits = jnp.where(mask[:, None, None, :], jnp.einsum('btnh,bsnh->bnts', q, k), jnp.finfo(jnp.float32).min)
    plain = jnp.einsum('bnts,bsnh->btnh', jax.nn.softmax(logits, axis=-1), v)
    np.testing.assert_allclose(layers.blocked_attention(q, k, v, mask, tile_bytes=4), plain, atol=1e-6)
