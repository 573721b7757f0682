"""Parity of the Flax semantic compressor (EfficientNetV2 features + mapper) with torchvision, and conversion."""

import json
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.efficientnet import EfficientNet, FusedMBConvConfig, MBConvConfig

from torch_reference import TOL, nchw, nhwc, randomise, rel_err
from wurst_jax import convert
from wurst_jax.convert import core
from wurst_jax.models.effnet import EFFICIENTNET_V2_L, EfficientNetEncoder

# (block type, expand ratio, kernel, stride, in, out, layers). torchvision rounds MBConvConfig widths to
# multiples of 8 (FusedMBConvConfig widths are taken as given), and every expanded width to a multiple of 8.
SMALL_A = (
    ('fused', 1, 3, 1, 13, 13, 2),  # expanded = make_divisible(13) = 16 != 13: expand + project convs
    ('fused', 3, 3, 2, 13, 24, 2),  # expanded 39 -> 40
    ('mb', 1, 3, 1, 24, 24, 1),  # no expand conv: depthwise is block.0, SE block.1
    ('mb', 4, 5, 2, 24, 32, 2),  # kernel 5, stride 2, SE squeeze 6 then 8
)  # total stride 8, head 4 * 32 = 128
SMALL_B = (
    ('fused', 1, 3, 1, 8, 8, 1),  # expanded == in: one conv with activation
    ('fused', 4, 3, 2, 8, 16, 1),
    ('fused', 4, 3, 2, 16, 24, 2),
    ('mb', 4, 3, 2, 24, 40, 2),
    ('mb', 6, 3, 2, 40, 48, 1),
)  # total stride 32, head 72


def torch_settings(stages):
    out = []
    for block_type, ratio, kernel, stride, c_in, c_out, n in stages:
        cls = FusedMBConvConfig if block_type == 'fused' else MBConvConfig
        out.append(cls(ratio, kernel, stride, c_in, c_out, n))
    return out


class TorchEncoder(torch.nn.Module):
    """The official `EfficientNetEncoder` (dome272/Wuerstchen modules.py, Stability-AI/StableCascade
    modules/effnet.py): `backbone` = torchvision features, `mapper` = Conv1x1 (no bias) + BatchNorm2d."""

    def __init__(self, backbone, last, affine, c_latent=16):
        super().__init__()
        self.backbone = backbone
        self.mapper = torch.nn.Sequential(
            torch.nn.Conv2d(last, c_latent, 1, bias=False), torch.nn.BatchNorm2d(c_latent, affine=affine)
        )

    def forward(self, x):
        return self.mapper(self.backbone(x))


def torch_encoder(stages, last, affine, sd_prob=0.2):
    net = EfficientNet(
        torch_settings(stages),
        dropout=0.0,
        stochastic_depth_prob=sd_prob,
        last_channel=last,
        norm_layer=partial(torch.nn.BatchNorm2d, eps=1e-3),
    )
    return TorchEncoder(net.features, last or 4 * stages[-1][5], affine)


def numpy_state(model):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def random_variables(module, seed):
    """Random variables of the module's shapes without `module.init` (slow on CPU for many small RNG ops)."""
    rng = np.random.default_rng(seed)
    shapes = core.abstract_variables(module, core.component('effnet'))
    return jax.tree.map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(s.dtype), shapes)


# The input normalisation of the released EfficientNetV2-S weights, as torchvision states it; the official
# Würstchen (utils.py effnet_preprocess) and Stable Cascade (train/train_c.py) code applies it with Normalize.
_WEIGHTS_TRANSFORMS = torchvision.models.EfficientNet_V2_S_Weights.IMAGENET1K_V1.transforms()
IMAGENET_NORMALIZE = torchvision.transforms.Normalize(mean=_WEIGHTS_TRANSFORMS.mean, std=_WEIGHTS_TRANSFORMS.std)


def torch_forward(ref, x01, normalize=True, scaling='none'):
    x = nchw(x01)
    if normalize:
        x = IMAGENET_NORMALIZE(x)
    with torch.no_grad():
        y = nhwc(ref(x))
    return (y + 1) / 42 if scaling == 'v2' else y


@pytest.mark.parametrize('affine', [True, False], ids=['affine', 'no_affine'])
@pytest.mark.parametrize(
    'stages,last,size', [(SMALL_A, None, (64, 96)), (SMALL_B, 72, (70, 90))], ids=['small_a', 'small_b_odd_size']
)
def test_matches_torchvision(stages, last, size, affine):
    ref = randomise(torch_encoder(stages, last, affine), seed=0)
    x = np.random.default_rng(1).uniform(0, 1, (2, *size, 3)).astype(np.float32)
    module = EfficientNetEncoder(stages=stages, last_channels=last or 0, mapper_affine=affine)
    variables = core.variables_from_state_dict(module, 'effnet', numpy_state(ref))
    assert ('mapper_1' in variables['params']) == affine  # a non-affine BN has statistics only
    for normalize, scaling in ((True, 'v2'), (False, 'none')):  # both values of each, one compile apiece
        m = module.clone(normalize_input=normalize, output_scaling=scaling)
        ours = jax.jit(m.apply)(variables, x)
        expected = torch_forward(ref, x, normalize, scaling)
        assert ours.shape == expected.shape
        assert rel_err(ours, expected) <= TOL, (normalize, scaling, rel_err(ours, expected))


def test_train_mode_batch_statistics():
    """train=True (no stochastic depth) normalises with batch statistics and updates every running mean and
    (unbiased) variance as torch's train mode does."""
    ref = randomise(torch_encoder(SMALL_B, 72, True, sd_prob=0.0), seed=3).train()
    module = EfficientNetEncoder(stages=SMALL_B, last_channels=72, stochastic_depth_prob=0.0, normalize_input=False)
    variables = core.variables_from_state_dict(module, 'effnet', numpy_state(ref))
    x = np.random.default_rng(4).uniform(0, 1, (3, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        expected = nhwc(ref(nchw(x)))
    ours, updates = jax.jit(partial(module.apply, train=True, mutable=['batch_stats']))(variables, x)
    assert rel_err(ours, expected) <= 1e-4
    assert set(updates) == {'batch_stats'}
    updated = core.variables_from_state_dict(module, 'effnet', numpy_state(ref))['batch_stats']
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), updates['batch_stats'], updated)


def test_stochastic_depth_only_in_train():
    module = EfficientNetEncoder(stages=SMALL_A, last_channels=24, stochastic_depth_prob=0.9)
    x = np.random.default_rng(5).uniform(0, 1, (4, 16, 16, 3)).astype(np.float32)
    variables = random_variables(module, 0)
    train = jax.jit(lambda k: module.apply(variables, x, train=True, mutable=['batch_stats'], rngs={'dropout': k})[0])
    a, b = train(jax.random.key(1)), train(jax.random.key(2))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, train(jax.random.key(1)))
    # Without stochastic depth the same batch statistics give the same output for any key.
    no_sd = jax.jit(
        lambda k: module.clone(stochastic_depth_prob=0.0).apply(
            variables, x, train=True, mutable=['batch_stats'], rngs={'dropout': k}
        )[0]
    )
    np.testing.assert_array_equal(no_sd(jax.random.key(1)), no_sd(jax.random.key(2)))


def test_stable_cascade_effnet_file_matches_torch(tmp_path):
    """Stable Cascade's effnet_encoder.safetensors as released (torchvision efficientnet_v2_s features, the
    mapper BatchNorm without affine) loads from the file alone and computes what the torch module does."""
    from safetensors.torch import save_file

    backbone = torchvision.models.efficientnet_v2_s(weights=None).features
    ref = randomise(TorchEncoder(backbone, 1280, affine=False), seed=6)
    save_file(ref.state_dict(), tmp_path / 'effnet_encoder.safetensors')
    module, variables = convert.load_diffusers(str(tmp_path / 'effnet_encoder.safetensors'), 'effnet')
    assert module == EfficientNetEncoder(mapper_affine=False)
    x = np.random.default_rng(7).uniform(0, 1, (1, 64, 64, 3)).astype(np.float32)
    ours = jax.jit(module.apply)(variables, x)
    expected = torch_forward(ref, x)
    assert ours.shape == (1, 2, 2, 16)
    assert rel_err(ours, expected) <= TOL


def test_wuerstchen_effnet_state_dict_matches_torch(tmp_path):
    """A Würstchen Stage B .pt (train_stage_B.py saves the effnet as 'effnet_state_dict', its mapper BatchNorm
    affine) loads with the affine mapper read off the file."""
    ref = randomise(torch_encoder(SMALL_A, None, affine=True), seed=10)
    decoder = {'clf.1.weight': torch.zeros(8, 4, 1, 1)}  # the generator's entry beside it
    torch.save({'state_dict': decoder, 'effnet_state_dict': ref.state_dict()}, tmp_path / 'model_v2_stage_b.pt')
    module, variables = convert.load_original(
        str(tmp_path / 'model_v2_stage_b.pt'), 'effnet', {'stages': SMALL_A, 'c_cond': 128}
    )
    assert module.mapper_affine
    x = np.random.default_rng(11).uniform(0, 1, (2, 24, 40, 3)).astype(np.float32)
    assert rel_err(jax.jit(module.apply)(variables, x), torch_forward(ref, x)) <= TOL


def test_wuerstchen_v1_effnet_v2_l_matches_torchvision(tmp_path):
    """Würstchen v1's compressor (dome272/Wuerstchen train_stage_B.py: `EfficientNetEncoder(effnet=
    "efficientnet_v2_l")`, torchvision efficientnet_v2_l features + the affine mapper), saved as the Stage B
    checkpoint's 'effnet_state_dict' beside the Paella generator: the architecture is read off the file, and the
    Flax encoder computes what torchvision's does (small input: the whole network, one compile). As in the V2-S
    test above, a randomised network this deep maps every image to nearly the same output (its random BatchNorm
    statistics wash the input out by the last stages; the small configurations above check the input path), so
    this checks the architecture and where each weight acts; 64 px keeps a 2x2 map, so a wrong stride shows."""
    with torch.device('meta'):  # randomise draws every tensor: torchvision's own init of 118M weights is not needed
        ref = TorchEncoder(torchvision.models.efficientnet_v2_l(weights=None).features, 1280, affine=True)
    ref = randomise(ref.to_empty(device='cpu'), seed=12)
    for counter in (b for b in ref.buffers() if not b.is_floating_point()):  # num_batches_tracked
        counter.zero_()
    x = np.random.default_rng(13).uniform(0, 1, (1, 64, 64, 3)).astype(np.float32)
    generator = {'in_mapper.0.weight': torch.zeros(8192, 256)}
    torch.save({'state_dict': generator, 'effnet_state_dict': ref.state_dict()}, tmp_path / 'model_stage_b.pt')
    module, variables = convert.load_original(str(tmp_path / 'model_stage_b.pt'), 'effnet')
    assert module == EfficientNetEncoder(stages=EFFICIENTNET_V2_L, mapper_affine=True)
    assert core.component('effnet').to_config(module)['effnet'] == 'efficientnet_v2_l'
    ours = jax.jit(module.apply)(variables, x)
    expected = torch_forward(ref, x)
    assert ours.shape == (1, 2, 2, 16)
    assert rel_err(ours, expected) <= TOL


@pytest.mark.parametrize('affine', [True, False], ids=['affine', 'no_affine'])
def test_full_size_parameter_count(affine):
    features = torchvision.models.efficientnet_v2_s(weights=None).features
    mapper = torch.nn.Sequential(torch.nn.Conv2d(1280, 16, 1, bias=False), torch.nn.BatchNorm2d(16, affine=affine))
    expected = sum(p.numel() for m in (features, mapper) for p in m.parameters())
    module = EfficientNetEncoder(mapper_affine=affine)
    shapes = jax.eval_shape(lambda k: module.init(k, jnp.zeros((1, 32, 32, 3))), jax.random.key(0))
    params = nn.meta.unbox(shapes['params'])
    assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)) == expected


def test_round_trip_is_bit_exact(tmp_path):
    module = EfficientNetEncoder(stages=SMALL_A, last_channels=128, mapper_affine=False, output_scaling='v2')
    x = np.random.default_rng(8).uniform(0, 1, (1, 32, 32, 3)).astype(np.float32)
    variables = random_variables(module, 1)
    convert.save_diffusers(module, variables, str(tmp_path / 'effnet'), 'effnet')
    config = json.loads((tmp_path / 'effnet' / 'config.json').read_text())
    assert config['_class_name'] == 'EfficientNetEncoder' and config['c_latent'] == 16 and config['c_cond'] == 128
    back_module, back = convert.load_diffusers(str(tmp_path / 'effnet'), 'effnet')
    assert back_module == module
    jax.tree.map(np.testing.assert_array_equal, back, variables)
    # The folder holds the checkpoint keys: no mapper BN weight/bias without affine.
    state = core.state_dict_from_variables(module, 'effnet', variables)
    assert 'mapper.0.weight' in state and 'mapper.1.running_var' in state and 'mapper.1.weight' not in state
    assert 'backbone.3.0.block.1.fc1.weight' in state
    # torch loads the folder strictly and computes what the Flax module computes.
    from safetensors.torch import load_file

    ref = torch_encoder(SMALL_A, 128, affine=False).eval()
    ref.load_state_dict(load_file(tmp_path / 'effnet' / core.DIFFUSERS_WEIGHTS), strict=True)
    assert rel_err(jax.jit(module.apply)(variables, x), torch_forward(ref, x, scaling='v2')) <= TOL


def test_default_config_names_efficientnet_v2_s():
    config = core.component('effnet').to_config(EfficientNetEncoder())
    assert config['effnet'] == 'efficientnet_v2_s' and config['c_cond'] == 1280 and 'stages' not in config
    assert (
        core.component('effnet').from_config({'c_latent': 16, 'c_cond': 1280, 'effnet': 'efficientnet_v2_s'})
        == EfficientNetEncoder()
    )


def test_wrong_shape_names_the_key():
    ref = randomise(torch_encoder(SMALL_A, None, True), seed=9)
    state = numpy_state(ref)
    state['backbone.2.1.block.0.0.weight'] = np.zeros((40, 24, 5, 5), np.float32)
    del state['mapper.1.bias']
    module = EfficientNetEncoder(stages=SMALL_A)
    with pytest.raises(ValueError, match=r'backbone\.2\.1\.block\.0\.0\.weight') as info:
        core.variables_from_state_dict(module, 'effnet', state)
    assert 'mapper.1.bias' in str(info.value)
