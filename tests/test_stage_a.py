"""Stage A networks: sizes, torch-order pixel shuffles, the quantiser, and the discriminator gate."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wurst_jax import tasks
from wurst_jax.models import layers
from wurst_jax.models.stage_a import VQGAN, Discriminator, VectorQuantizer


def test_wuerstchen_size_param_count():
    variables = jax.eval_shape(lambda k: VQGAN().init(k, jnp.zeros((1, 64, 64, 3))), jax.random.key(0))
    params = nn.meta.unbox(variables['params'])
    assert sum(x.size for x in jax.tree.leaves(params)) == 18_406_894
    assert jax.eval_shape(lambda k: VQGAN().init(k, jnp.zeros((1, 64, 64, 3))), jax.random.key(0))['batch_stats'][
        'latent_norm'
    ]['mean'].shape == (4,)


def test_pixel_unshuffle_uses_torch_channel_order():
    x = np.random.RandomState(0).randn(2, 6, 4, 3).astype(np.float32)
    y = np.asarray(layers.pixel_unshuffle(jnp.asarray(x), 2))
    # torch: out[c * r * r + i * r + j, h, w] = in[c, h * r + i, w * r + j]
    for c in range(3):
        for i in range(2):
            for j in range(2):
                np.testing.assert_array_equal(y[..., c * 4 + i * 2 + j], x[:, i::2, j::2, c])
    np.testing.assert_array_equal(np.asarray(layers.pixel_shuffle(jnp.asarray(y), 2)), x)


def test_encode_decode_shapes_are_f4():
    model = VQGAN(levels=2, embed_dim=16, bottleneck_blocks=1, num_codes=16)
    x = jnp.zeros((2, 32, 24, 3))
    variables = model.init(jax.random.key(0), x)
    h = model.apply(variables, x, method=VQGAN.encode)
    assert h.shape == (2, 8, 6, 4)
    assert model.apply(variables, h, method=VQGAN.decode).shape == x.shape


def test_quantizer_picks_nearest_code_with_straight_through_gradient():
    vq = VectorQuantizer(num_codes=10, code_dim=3)
    z = jax.random.normal(jax.random.key(1), (2, 4, 4, 3)) * 0.01
    variables = nn.meta.unbox(vq.init(jax.random.key(0), z))
    codebook = np.asarray(variables['params']['codebook'])
    quantised, indices, vq_loss, commit = vq.apply(variables, z)
    dists = ((np.asarray(z)[..., None, :] - codebook) ** 2).sum(-1)
    np.testing.assert_array_equal(np.asarray(indices), dists.argmin(-1))
    np.testing.assert_allclose(np.asarray(quantised), codebook[dists.argmin(-1)], atol=1e-7)
    np.testing.assert_allclose(float(vq_loss), float(commit), rtol=1e-6)
    grad = jax.grad(lambda z: vq.apply(variables, z)[0].sum())(z)
    np.testing.assert_array_equal(np.asarray(grad), np.ones_like(z))


def test_discriminator_downsamples_by_two_per_layer():
    disc = Discriminator(c_hidden=16, depth=3)
    x = jnp.zeros((2, 32, 32, 3))
    variables = disc.init(jax.random.key(0), x)
    assert disc.apply(variables, x).shape == (2, 4, 4, 1)


def test_discriminator_is_frozen_until_adv_start(tiny_shapes_config):
    config = tiny_shapes_config
    config.loss.adv_start = 5
    task = tasks.create(config)
    params, state = nn.meta.unbox(task.init(jax.random.key(0), {'image': jnp.zeros((1, 16, 16, 3))}))
    batch = {'image': jax.random.uniform(jax.random.key(1), (4, 16, 16, 3), minval=-1, maxval=1)}
    grads_fn = jax.jit(functools.partial(task.grads, params, state, {}, batch, jax.random.key(2)))
    before, _, metrics_before = grads_fn(jnp.int32(4))
    after, _, metrics_after = grads_fn(jnp.int32(5))
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(before['disc']))
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(after['disc']))
    assert float(metrics_before['disc_loss']) == 0  # not even run before adv_start
    assert float(metrics_after['disc_loss']) > 0 and float(metrics_after['adv_loss']) > 0


def write_torchvision_vgg16(path, seed=0):
    """torchvision's vgg16 with random features, its state dict saved with torch.save as a user would (the
    classifier, 120M parameters the loss never reads, stays on the meta device and out of the file)."""
    import torch
    import torchvision

    from torch_reference import randomise

    with torch.device('meta'):
        ref = torchvision.models.vgg16(weights=None)
    ref.features.to_empty(device='cpu')
    randomise(ref.features, seed, scale=0.05)  # about unit gain per conv: deep maps stay O(1)
    state = {k: v for k, v in ref.state_dict().items() if not v.is_meta}
    torch.save(state, path)
    return ref.features, state


def test_vgg16_features_match_torchvision(tmp_path):
    """Our VGG16Features with a real torchvision vgg16 state dict (.pth, and the same tensors as .npz) gives
    torchvision's ReLU maps at LPIPS's five taps, after LPIPS's input scaling."""
    import torch

    from torch_reference import TOL, nchw, nhwc, rel_err
    from wurst_jax import perceptual
    from wurst_jax.models.vgg import VGG16Features

    features, state = write_torchvision_vgg16(tmp_path / 'vgg16.pth')
    params = perceptual.load_vgg16_params(str(tmp_path / 'vgg16.pth'))
    np.savez(tmp_path / 'vgg16.npz', **{k: v.numpy() for k, v in state.items()})
    jax.tree.map(np.testing.assert_array_equal, perceptual.load_vgg16_params(str(tmp_path / 'vgg16.npz')), params)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 37, 26, 3)).astype(np.float32)  # odd: pools floor
    # LPIPS (richzhang/PerceptualSimilarity lpips/lpips.py ScalingLayer) for inputs in [-1, 1], and its vgg16
    # slices (lpips/pretrained_networks.py): the outputs of features[:4], [:9], [:16], [:23], [:30].
    shift = torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None]
    scale = torch.tensor([0.458, 0.448, 0.450])[None, :, None, None]
    h, expected = (nchw(x) - shift) / scale, []
    with torch.no_grad():
        for index, layer in enumerate(features[:30]):  # the last pool is not read
            h = layer(h)
            if index in (3, 8, 15, 22, 29):
                expected.append(nhwc(h))
    ours = jax.jit(VGG16Features().apply)({'params': params}, x)
    assert [f.shape for f in ours] == [e.shape for e in expected]
    for a, b in zip(ours, expected):
        assert rel_err(a, b) <= TOL


def test_perceptual_loss_reads_local_weights_and_trains(tiny_shapes_config, tmp_path):
    from wurst_jax import config_lib, perceptual
    from wurst_jax.models.vgg import VGG16Features, perceptual_distance

    weights = tmp_path / 'vgg16.pth'
    write_torchvision_vgg16(weights)
    params = perceptual.load_vgg16_params(str(weights))
    x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
    feats = VGG16Features().apply({'params': params}, x)
    assert float(jnp.max(perceptual_distance(feats, feats))) == 0.0
    other = VGG16Features().apply({'params': params}, -x)
    assert float(jnp.min(perceptual_distance(feats, other))) > 0.0

    config = tiny_shapes_config
    config.input.image_size = 32
    config.loss.perceptual_weight = 0.1
    config.loss.perceptual_weights = str(tmp_path / 'missing.npz')
    with pytest.raises(config_lib.ConfigError, match='config.loss.perceptual_weights='):
        tasks.validate(config)
    config.loss.perceptual_weights = str(weights)
    tasks.validate(config)
    task = tasks.create(config)
    variables, state = nn.meta.unbox(task.init(jax.random.key(0), {'image': jnp.zeros((1, 32, 32, 3))}))
    _, _, metrics = jax.jit(task.grads)(
        variables, state, task.frozen_params(), {'image': x}, jax.random.key(1), jnp.int32(0)
    )
    assert float(metrics['perceptual_loss']) > 0
    assert float(metrics['loss']) > float(metrics['mse'])


def test_bfloat16_compute_keeps_float32_params(tiny_shapes_config):
    config = tiny_shapes_config
    config.dtype = 'bfloat16'
    task = tasks.create(config)
    params, state = nn.meta.unbox(task.init(jax.random.key(0), {'image': jnp.zeros((1, 16, 16, 3))}))
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype('float32')}
    batch = {'image': jax.random.uniform(jax.random.key(1), (4, 16, 16, 3), minval=-1, maxval=1)}
    grads, _, metrics = jax.jit(task.grads)(params, state, {}, batch, jax.random.key(2), jnp.int32(0))
    assert {x.dtype for x in jax.tree.leaves(grads)} == {jnp.dtype('float32')}
    assert np.isfinite(float(metrics['loss']))
    # The forward really ran in bfloat16: it differs from the float32 one, but not by much.
    config.dtype = 'float32'
    _, _, metrics32 = jax.jit(tasks.create(config).grads)(params, state, {}, batch, jax.random.key(2), jnp.int32(0))
    assert float(metrics['mse']) != float(metrics32['mse'])
    assert abs(float(metrics['mse']) - float(metrics32['mse'])) < 0.05 * float(metrics32['mse'])


def test_evaluation_reports_the_latent_std(tiny_shapes_config):
    """Stage A's evaluation gives the std of h over every entry of the held-out batches: what
    stage_a.scale_factor is set to for unit-variance latents."""
    task = tasks.create(tiny_shapes_config)
    params, state = nn.meta.unbox(task.init(jax.random.key(0), {'image': jnp.zeros((1, 16, 16, 3))}))
    batches = [
        {'image': np.asarray(jax.random.uniform(jax.random.key(i), (n, 16, 16, 3), minval=-1, maxval=1))}
        for i, n in ((1, 3), (2, 5))
    ]
    metrics = task.evaluate(params, state, {}, batches)
    variables = {'params': params['vqgan'], **state['vqgan']}
    h = np.concatenate([task.vqgan.apply(variables, b['image'], method=VQGAN.encode) for b in batches])
    assert metrics['num_images'] == 8
    np.testing.assert_allclose(metrics['latent_std'], h.std(), rtol=1e-4)
    assert metrics['psnr'] > 0 and metrics['psnr_quantized'] > 0


def test_stage_a_scale_factor_divides_the_latents_and_decodes_them_back(tiny_stage_folders):
    """stage_a.scale_factor replaces the VQGAN's own divisor for the stages after it (0 keeps it), the
    decoder multiplying by the same factor; a negative one is refused by name."""
    import ml_collections

    from wurst_jax.config_lib import ConfigError
    from wurst_jax.tasks import conditioning

    images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
    spaces = {}
    for factor in (0.0, 0.25):
        stage_a = ml_collections.ConfigDict(dict(source=str(tiny_stage_folders['vqgan']), scale_factor=factor))
        conditioning.validate_stage_a(stage_a)
        vqgan, variables = conditioning.load_stage_a(stage_a)
        latents = conditioning.stage_a_latents(vqgan, variables, images)
        spaces[factor] = vqgan, latents, conditioning.stage_a_decode(vqgan, variables, latents)
    own = spaces[0.0][0].scale_factor
    assert own == VQGAN.scale_factor
    np.testing.assert_allclose(spaces[0.25][1], spaces[0.0][1] * own / 0.25, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(spaces[0.25][2], spaces[0.0][2], rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match='stage_a.scale_factor'):
        conditioning.validate_stage_a(ml_collections.ConfigDict(dict(source=stage_a.source, scale_factor=-1.0)))
