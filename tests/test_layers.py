"""The per-backend kernels of models/layers.py compute the same thing whichever is chosen: the depthwise
conv against flax's grouped nn.Conv, the 4x4 stride-2 transposed conv against torch's, attention's einsum
and blocked forms against jax.nn.dot_product_attention; BatchNorm's train step against torch's BatchNorm2d."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from torch_reference import nchw, nhwc, randomise
from wurst_jax.models import kernels, layers


@pytest.mark.parametrize('padding', ['VALID', ((1, 1), (2, 0))])
@pytest.mark.parametrize('kernel', ['shifted', 'grouped'])
@pytest.mark.parametrize('per_group', [1, 2], ids=['depthwise', 'two_inputs_per_group'])  # 2: Paella's skip block
def test_depthwise_conv_equals_grouped_nn_conv(monkeypatch, padding, kernel, per_group):
    monkeypatch.setattr(kernels, 'depthwise_kernel', lambda: kernel)
    x = jax.random.normal(jax.random.key(1), (2, 7, 9, 6 * per_group))
    reference = nn.Conv(6, (3, 3), padding=padding, feature_group_count=6)
    variables = reference.init(jax.random.key(0), x)
    variables['params']['bias'] = jnp.linspace(-1, 1, 6)
    ours = layers.DepthwiseConv(6, 3, padding)
    assert jax.tree.map(jnp.shape, nn.meta.unbox(ours.init(jax.random.key(0), x))) == jax.tree.map(jnp.shape, variables)

    def loss(module, v, x):
        return jnp.sum(jnp.sin(module.apply(v, x)))

    np.testing.assert_allclose(ours.apply(variables, x), reference.apply(variables, x), rtol=1e-5, atol=1e-5)
    for got, want in zip(
        jax.grad(loss, argnums=(1, 2))(ours, variables, x), jax.grad(loss, argnums=(1, 2))(reference, variables, x)
    ):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, want)


@pytest.mark.parametrize('kernel', ['phases', 'lax'])
def test_conv_transpose_kernels_match_torch_forward_and_backward(monkeypatch, kernel):
    """ConvTranspose2d(k=4, stride=2, padding=1), the VQGAN's upsampling, by either kernel: torch's output
    and its gradients for the input, kernel and bias; params shaped as nn.ConvTranspose's."""
    monkeypatch.setattr(kernels, 'conv_transpose_kernel', lambda: kernel)
    x = np.random.default_rng(0).standard_normal((2, 5, 7, 6)).astype(np.float32)
    ref = torch.nn.ConvTranspose2d(6, 4, 4, stride=2, padding=1)
    module = layers.conv_transpose(4, (4, 4), strides=2, torch_padding=1)
    flax_twin = nn.ConvTranspose(4, (4, 4), (2, 2), ((2, 2), (2, 2)), transpose_kernel=True)
    shapes = jax.tree.map(jnp.shape, nn.meta.unbox(module.init(jax.random.key(0), x)))
    assert shapes == jax.tree.map(jnp.shape, flax_twin.init(jax.random.key(0), x))
    params = {'kernel': ref.weight.detach().numpy().transpose(2, 3, 1, 0), 'bias': ref.bias.detach().numpy()}

    x_torch = nchw(x).requires_grad_()
    out = ref(x_torch)
    torch.sin(out).sum().backward()

    def loss(params, x):
        return jnp.sum(jnp.sin(module.apply({'params': params}, x)))

    np.testing.assert_allclose(module.apply({'params': params}, x), nhwc(out), rtol=1e-4, atol=1e-5)
    d_params, d_x = jax.grad(loss, argnums=(0, 1))(params, x)
    np.testing.assert_allclose(d_x, nhwc(x_torch.grad), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(d_params['kernel'], ref.weight.grad.numpy().transpose(2, 3, 1, 0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(d_params['bias'], ref.bias.grad.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('tile_bytes', [2**22, 448])  # one block of queries; two of 8 rows, 2 padded
def test_attention_kernels_agree(monkeypatch, tile_bytes):
    """Every kernel gives the same output and gradients, with right-padded keys masked. 'cudnn' here is
    its GPU path on XLA's attention: 7 keys zero-padded to 64, masked by each row's length."""
    x = jax.random.normal(jax.random.key(0), (2, 14, 16))
    kv = jax.random.normal(jax.random.key(1), (2, 7, 12))
    mask = jnp.array([[1] * 7, [1] * 4 + [0] * 3])
    module = layers.Attention(16, 4)
    variables = module.init(jax.random.key(2), x, kv)
    monkeypatch.setattr(
        kernels, 'blocked_attention', lambda *a, blocked=kernels.blocked_attention: blocked(*a, tile_bytes=tile_bytes)
    )

    def loss(variables, x, kv):
        return jnp.sum(jnp.sin(module.apply(variables, x, kv, mask=mask)))

    outputs, grads = {}, {}
    for kernel in kernels.ATTENTION_KERNELS:
        with kernels.forced_attention_kernel(kernel):
            outputs[kernel] = module.apply(variables, x, kv, mask=mask)
            grads[kernel] = jax.grad(loss, argnums=(0, 1, 2))(variables, x, kv)
    for kernel in ('einsum', 'blocked', 'cudnn'):
        np.testing.assert_allclose(outputs[kernel], outputs['dot_product_attention'], rtol=1e-5, atol=1e-6)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
            grads[kernel],
            grads['dot_product_attention'],
        )
    # The mask matters: the second sample's padded keys are ignored, its kept keys are not.
    changed = kv.at[1, 4:].add(3.0)
    np.testing.assert_allclose(module.apply(variables, x, changed, mask=mask)[1], outputs['blocked'][1], atol=1e-6)
    assert not np.allclose(module.apply(variables, x, changed)[1], outputs['blocked'][1], atol=1e-3)


def test_padded_attention_pads_keys_to_the_cudnn_multiple_and_masks_by_length(monkeypatch):
    """The keys reach jax.nn.dot_product_attention padded to a multiple of 64, with each row's length;
    653 keys (Würstchen's 576 image + 77 text tokens) give 704, and the padding is never attended."""
    q = jax.random.normal(jax.random.key(0), (2, 6, 2, 8))
    k, v = (jax.random.normal(jax.random.key(i), (2, 653, 2, 8)) for i in (1, 2))
    mask = jnp.arange(653)[None] < jnp.array([[653], [100]])
    seen = {}
    call = jax.nn.dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.update(keys=k.shape[1], lengths=kwargs['key_value_seq_lengths'], implementation=kwargs['implementation'])
        return call(q, k, v, **kwargs)

    monkeypatch.setattr(jax.nn, 'dot_product_attention', spy)
    out = kernels.padded_attention(q, k, v, mask)
    assert seen['keys'] == 704 and seen['implementation'] == 'xla'
    np.testing.assert_array_equal(seen['lengths'], [653, 100])
    logits = jnp.where(mask[:, None, None], jnp.einsum('btnh,bsnh->bnts', q, k) / np.sqrt(8), -jnp.inf)
    plain = jnp.einsum('bnts,bsnh->btnh', jax.nn.softmax(logits, axis=-1), v)
    np.testing.assert_allclose(out, plain, rtol=1e-5, atol=1e-6)


def test_attention_dropout_is_on_the_output_projection():
    """Training with dropout zeroes whole output features and scales the rest by 1 / (1 - p), as
    diffusers' Attention does after `to_out`; the attention itself (any kernel) is the eval one."""
    x = jax.random.normal(jax.random.key(0), (2, 9, 16))
    module = layers.Attention(16, 2, dropout=0.5)
    variables = module.init(jax.random.key(1), x, x)
    eval_out = module.apply(variables, x, x)
    train_out = module.apply(variables, x, x, deterministic=False, rngs={'dropout': jax.random.key(2)})
    dropped = np.asarray(train_out) == 0
    assert 0.3 < dropped.mean() < 0.7
    np.testing.assert_allclose(np.asarray(train_out)[~dropped], 2 * np.asarray(eval_out)[~dropped], rtol=1e-5)


def test_blocked_attention_with_every_key_masked_matches_the_plain_form():
    """A row with no key to attend (a fully padded caption) averages all values, as the plain form does."""
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 5, 2, 4)) for i in range(3))
    mask = jnp.zeros((1, 5), bool)
    logits = jnp.where(mask[:, None, None, :], jnp.einsum('btnh,bsnh->bnts', q, k), jnp.finfo(jnp.float32).min)
    plain = jnp.einsum('bnts,bsnh->btnh', jax.nn.softmax(logits, axis=-1), v)
    np.testing.assert_allclose(kernels.blocked_attention(q, k, v, mask, tile_bytes=4), plain, atol=1e-6)


@pytest.mark.parametrize('affine,eps', [(True, 1e-3), (False, 1e-5)])  # the effnet's backbone and SC's mapper
def test_batch_norm_train_step_matches_torch(affine, eps):
    """From the same statistics and batch: torch's train-mode output and updated running mean and (unbiased)
    variance, then its eval-mode output; the batch sharded over the 8 devices, one sample each, still
    normalises with the whole batch's statistics."""
    ref = randomise(torch.nn.BatchNorm2d(6, eps=eps, affine=affine), seed=0)
    state = {k: v.numpy().copy() for k, v in ref.state_dict().items()}
    variables = {'batch_stats': {'mean': state['running_mean'], 'var': state['running_var']}}
    if affine:
        variables['params'] = {'scale': state['weight'], 'bias': state['bias']}
    x = (2 + 3 * np.random.default_rng(1).standard_normal((8, 5, 3, 6))).astype(np.float32)
    with torch.no_grad():
        expected = nhwc(ref.train()(nchw(x)))
        expected_eval = nhwc(ref.eval()(nchw(x)))
    module = layers.BatchNorm(epsilon=eps, affine=affine)
    assert jax.tree.map(
        np.shape, nn.meta.unbox(module.init(jax.random.key(0), x, use_running_average=False))
    ) == jax.tree.map(np.shape, variables)
    mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
    step = jax.jit(lambda v, x: module.apply(v, x, use_running_average=False, mutable=['batch_stats']))
    for batch in (x, jax.device_put(x, NamedSharding(mesh, P('data')))):
        out, updates = step(variables, batch)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(updates['batch_stats']['mean'], ref.running_mean.numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(updates['batch_stats']['var'], ref.running_var.numpy(), rtol=1e-6, atol=1e-6)
    evaluated = module.apply({**variables, 'batch_stats': updates['batch_stats']}, x, use_running_average=True)
    np.testing.assert_allclose(evaluated, expected_eval, rtol=1e-5, atol=1e-5)
