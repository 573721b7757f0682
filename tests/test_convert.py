"""Parity of the Flax networks with the diffusers PyTorch references, and conversion both ways."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior

from torch_reference import TOL, Attention2D, nchw, nhwc, randomise, rel_err
from wurst_jax import convert
from wurst_jax.models.stage_a import VQGAN

PRIOR_CONFIGS = [
    dict(c_in=16, c=64, c_cond=32, c_r=64, depth=2, nhead=4, dropout=0.0),  # Würstchen's c_r
    dict(c_in=6, c=48, c_cond=20, c_r=15, depth=3, nhead=3, dropout=0.0),  # odd c_r: zero-padded embedding
]


@pytest.mark.parametrize('cfg', PRIOR_CONFIGS, ids=['prior_a', 'prior_b_odd'])
@pytest.mark.parametrize('scan', [False, True], ids=['unrolled', 'scanned'])
def test_prior_matches_diffusers(tmp_path, cfg, scan):
    ref = randomise(WuerstchenPrior(**cfg), seed=0)
    with torch.no_grad():  # keep |1 - b| away from 0: the output divides by it and would amplify rounding
        ref.out[1].weight.mul_(0.05)
        ref.out[1].bias.mul_(0.05)
    ref.save_pretrained(tmp_path)
    module, variables = convert.load_diffusers(str(tmp_path), 'prior', scan_blocks=scan)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 12, 8, cfg['c_in'])).astype(np.float32)  # non-square latents
    r = np.array([0.01, 0.5, 0.9, 1.0], np.float32)  # at r ~ 1 the embedding's angles reach 1e4 rad
    c = rng.standard_normal((4, 7, cfg['c_cond'])).astype(np.float32)
    with torch.no_grad():
        expected = ref(nchw(x), torch.from_numpy(r), torch.from_numpy(c)).numpy().transpose(0, 2, 3, 1)
    ours = jax.jit(module.apply)(variables, x, r, c)
    assert rel_err(ours, expected) <= TOL


DECODER_CONFIGS = [
    dict(
        c_r=64,
        c_cond=32,
        c_hidden=[16, 24, 32],
        nhead=[-1, 2, 4],
        blocks=[1, 2, 1],
        level_config=['CT', 'CTA', 'CTA'],
        inject_effnet=[False, True, True],
        effnet_embd=5,
        clip_embd=12,
        dropout=0.0,
    ),
    # Effnet injected at every level, odd widths and a 5x5 depthwise kernel, two levels, per-level dropout.
    dict(
        c_in=3,
        c_out=3,
        c_r=15,
        c_cond=20,
        c_hidden=[12, 18],
        nhead=[3, 3],
        blocks=[2, 1],
        level_config=['CTA', 'CTA'],
        inject_effnet=[True, True],
        effnet_embd=7,
        clip_embd=9,
        kernel_size=5,
        dropout=[0.0, 0.0],
    ),
    # The released layout (CT, then CTA levels, four levels), narrow; patch size 1.
    dict(
        c_r=8,
        patch_size=1,
        c_cond=16,
        c_hidden=[8, 16, 16, 24],
        nhead=[-1, 2, 2, 3],
        blocks=[1, 1, 2, 1],
        dropout=0.0,
        effnet_embd=4,
        clip_embd=10,
    ),
]


@pytest.mark.parametrize('cfg', DECODER_CONFIGS, ids=['decoder_3_levels', 'decoder_all_inject', 'decoder_4_levels'])
def test_decoder_matches_diffusers(tmp_path, cfg):
    ref = randomise(WuerstchenDiffNeXt(**cfg), seed=5)
    with torch.no_grad():  # keep b' off its 1e-3 floor: the output divides by it and would amplify rounding
        ref.clf[1].weight.mul_(0.1)
    ref.save_pretrained(tmp_path)
    module, variables = convert.load_diffusers(str(tmp_path), 'decoder')
    rng = np.random.default_rng(6)
    unit = module.patch_size * 2 ** (len(module.c_hidden) - 1)
    x = rng.standard_normal((4, 2 * unit, 3 * unit, module.c_in)).astype(np.float32)  # non-square latents
    r = np.array([0.01, 0.5, 0.9, 1.0], np.float32)  # at r ~ 1 the embedding's angles reach 1e4 rad
    effnet = rng.standard_normal((4, 3, 5, module.effnet_embd)).astype(np.float32)
    clip = rng.standard_normal((4, 6, module.clip_embd)).astype(np.float32)
    with torch.no_grad():
        expected = nhwc(ref(nchw(x), torch.from_numpy(r), nchw(effnet), torch.from_numpy(clip)))
    assert rel_err(jax.jit(module.apply)(variables, x, r, effnet, clip), expected) <= TOL


def test_decoder_round_trip_loads_in_diffusers(tmp_path):
    """Flax -> diffusers folder: diffusers computes the same; folder -> Flax is bit-exact."""
    from wurst_jax.models.stage_b import WuerstchenDiffNeXt as FlaxDecoder

    module = FlaxDecoder(
        c_r=8,
        c_cond=16,
        c_hidden=(8, 16),
        nhead=(-1, 2),
        blocks=(1, 1),
        level_config=('CT', 'CTA'),
        inject_effnet=(False, True),
        effnet_embd=4,
        clip_embd=6,
        dropout=0.0,
    )
    inputs = (
        np.random.default_rng(0).standard_normal((1, 8, 12, 4)).astype(np.float32),
        np.array([0.3], np.float32),
        np.ones((1, 2, 3, 4), np.float32),
        np.ones((1, 3, 6), np.float32),
    )
    variables = module.init(jax.random.key(0), *inputs)
    # Random everywhere: init zeroes the output conv and the FiLM mappers, which would hide mistakes.
    leaves, tree = jax.tree.flatten(__import__('flax').linen.meta.unbox(variables))
    keys = jax.random.split(jax.random.key(1), len(leaves))
    variables = jax.tree.unflatten(tree, [np.array(0.2 * jax.random.normal(k, x.shape)) for k, x in zip(keys, leaves)])
    variables['params']['clf_1']['kernel'] *= 0.1  # keep b' off its 1e-3 floor: the output divides by it
    convert.save_diffusers(module, variables, str(tmp_path / 'dec'), 'decoder')

    ref = WuerstchenDiffNeXt.from_pretrained(tmp_path / 'dec').eval()
    x, r, effnet, clip = inputs
    with torch.no_grad():
        expected = nhwc(ref(nchw(x), torch.from_numpy(r), nchw(effnet), torch.from_numpy(clip)))
    assert rel_err(module.apply(variables, *inputs), expected) <= TOL
    _, back = convert.load_diffusers(str(tmp_path / 'dec'), 'decoder')
    jax.tree.map(np.testing.assert_array_equal, back, variables)


VQGAN_CONFIGS = [
    dict(levels=2, embed_dim=16, bottleneck_blocks=1, latent_channels=4, num_vq_embeddings=32),
    dict(
        levels=3,
        embed_dim=24,
        bottleneck_blocks=2,
        latent_channels=3,
        num_vq_embeddings=16,
        up_down_scale_factor=2,
        out_channels=5,
    ),
]


@pytest.mark.parametrize('cfg', VQGAN_CONFIGS, ids=['vqgan_2_levels', 'vqgan_3_levels'])
def test_vqgan_matches_diffusers(tmp_path, cfg):
    ref = randomise(PaellaVQModel(**cfg), seed=2)
    ref.save_pretrained(tmp_path)
    module, variables = convert.load_diffusers(str(tmp_path), 'vqgan')
    size = 2 * 2 ** cfg['levels']
    x = np.random.default_rng(3).uniform(0, 1, (2, 3 * size, 2 * size, 3)).astype(np.float32)
    with torch.no_grad():
        h_ref = ref.encode(nchw(x)).latents
        dec_ref = ref.decode(h_ref).sample.numpy().transpose(0, 2, 3, 1)
        quant_ref = ref.decode(h_ref, force_not_quantize=False).sample.numpy().transpose(0, 2, 3, 1)
    h = module.apply(variables, x, method=VQGAN.encode)
    assert rel_err(h, h_ref.numpy().transpose(0, 2, 3, 1)) <= TOL
    assert rel_err(module.apply(variables, h, method=VQGAN.decode), dec_ref) <= TOL
    quantised = module.apply(variables, h, method=VQGAN.quantize)[0]
    assert rel_err(module.apply(variables, quantised, method=VQGAN.decode), quant_ref) <= TOL


def test_flax_to_diffusers_to_flax_round_trip(tmp_path):
    module = VQGAN(levels=2, embed_dim=16, bottleneck_blocks=1, num_codes=32)
    x = np.random.default_rng(0).uniform(0, 1, (1, 16, 16, 3)).astype(np.float32)
    variables = jax.tree.map(lambda a: a + 0.1, module.init(jax.random.key(0), x))
    variables = jax.tree.map(np.asarray, __import__('flax').linen.meta.unbox(variables))
    convert.save_diffusers(module, variables, str(tmp_path / 'vq'), 'vqgan')

    # diffusers loads the folder and computes what the Flax module computes.
    ref = PaellaVQModel.from_pretrained(tmp_path / 'vq').eval()
    with torch.no_grad():
        expected = ref.decode(ref.encode(nchw(x)).latents).sample.numpy().transpose(0, 2, 3, 1)
    ours = module.apply(variables, module.apply(variables, x, method=VQGAN.encode), method=VQGAN.decode)
    assert rel_err(ours, expected) <= TOL

    _, back = convert.load_diffusers(str(tmp_path / 'vq'), 'vqgan')
    jax.tree.map(np.testing.assert_array_equal, back, variables)


def test_bad_weights_name_every_bad_key(tmp_path):
    ref = randomise(PaellaVQModel(levels=2, embed_dim=16, bottleneck_blocks=1, num_vq_embeddings=8), seed=0)
    ref.save_pretrained(tmp_path)
    state = convert.core.load_file(str(tmp_path / convert.core.DIFFUSERS_WEIGHTS))
    del state['in_block.1.bias']
    state['extra.weight'] = np.zeros(3, np.float32)
    state['out_block.0.weight'] = np.zeros((5, 8, 1, 1), np.float32)
    module = convert.core.COMPONENTS['vqgan'].from_config(json.loads((tmp_path / 'config.json').read_text()))
    with pytest.raises(ValueError) as err:
        convert.core.variables_from_state_dict(module, 'vqgan', state)
    message = str(err.value)
    assert 'in_block.1.bias' in message and 'extra.weight' in message and 'out_block.0.weight' in message
    with pytest.raises(ValueError, match='valid components are'):
        convert.load_diffusers(str(tmp_path), 'stage_z')
    with pytest.raises(ValueError, match='PaellaVQModel'):
        convert.load_diffusers(str(tmp_path), 'prior')


class VectorQuantize(torch.nn.Module):
    """The official quantiser (pabloppp/pytorch-tools torchtools/nn/vq.py, used by dome272/Wuerstchen vqgan.py
    and Stable Cascade modules/stage_a.py): an nn.Embedding `codebook`, nearest code by squared distance.
    Returns (quantised, None, None) as diffusers' PaellaVQModel.decode unpacks it."""

    def __init__(self, embedding_size, k):
        super().__init__()
        self.codebook = torch.nn.Embedding(k, embedding_size)

    def forward(self, x):
        z = x.movedim(1, -1)
        flat = z.reshape(-1, z.shape[-1])
        codes = self.codebook.weight
        dist = torch.addmm((codes**2).sum(1) + (flat**2).sum(1, keepdim=True), flat, codes.t(), alpha=-2.0)
        return codes[dist.argmin(1)].view(z.shape).movedim(-1, 1), None, None


def with_official_layers(model):
    """A diffusers Würstchen model turned into the official module tree: its attention and codebook become the
    official layer types above; every other module diffusers ported under the official name and type."""
    from diffusers.pipelines.deprecated.wuerstchen.modeling_wuerstchen_common import AttnBlock

    for block in [m for m in model.modules() if isinstance(m, AttnBlock)]:
        block.attention = Attention2D(block.attention.inner_dim, block.attention.heads)
    if isinstance(model, PaellaVQModel):
        model.vquantizer = VectorQuantize(model.config.latent_channels, model.config.num_vq_embeddings)
    return model


def _torch_outputs(component, model) -> list[np.ndarray]:
    """The outputs of a torch Würstchen model on one fixed batch (VQGAN: latents, decoded, quantised decoded)."""
    rng = np.random.default_rng(8)
    r = torch.tensor([0.2, 0.7])
    with torch.no_grad():
        if component == 'vqgan':
            latents = model.encode(torch.from_numpy(rng.uniform(0, 1, (2, 3, 24, 16)).astype(np.float32))).latents
            return [
                latents.numpy(),
                model.decode(latents).sample.numpy(),
                model.decode(latents, force_not_quantize=False).sample.numpy(),
            ]
        if component == 'prior':
            x = torch.from_numpy(rng.standard_normal((2, model.config.c_in, 6, 4)).astype(np.float32))
            return [
                model(
                    x, r, torch.from_numpy(rng.standard_normal((2, 5, model.config.c_cond)).astype(np.float32))
                ).numpy()
            ]
        cfg = model.config
        x = torch.from_numpy(rng.standard_normal((2, cfg.c_in, 8, 16)).astype(np.float32))
        effnet = torch.from_numpy(rng.standard_normal((2, cfg.effnet_embd, 3, 5)).astype(np.float32))
        clip = torch.from_numpy(rng.standard_normal((2, 6, cfg.clip_embd)).astype(np.float32))
        return [model(x, r, effnet, clip).numpy()]


@pytest.mark.parametrize(
    'component, make, entry',
    [
        ('prior', lambda: WuerstchenPrior(**PRIOR_CONFIGS[0]), 'ema_state_dict'),
        ('decoder', lambda: WuerstchenDiffNeXt(**DECODER_CONFIGS[0]), 'state_dict'),
        ('vqgan', lambda: PaellaVQModel(**VQGAN_CONFIGS[0]), 'state_dict'),
    ],
)
def test_original_checkpoint_matches_official_modules(tmp_path, component, make, entry):
    """A checkpoint of the official module tree, saved as the official scripts save it (dome272/Wuerstchen
    train_stage_C.py / train_stage_B.py: torch.save of a dict of state dicts; Stable Cascade: a flat
    .safetensors), loads into ours; the diffusers model our variables map to computes what the official modules
    compute (our Flax modules compute what diffusers does: the tests above)."""
    ref = randomise(with_official_layers(make()), seed=7)
    with torch.no_grad():  # keep the output's divisor away from 0, where it would amplify rounding
        if component == 'prior':
            ref.out[1].weight.mul_(0.05)
            ref.out[1].bias.mul_(0.05)
        elif component == 'decoder':
            ref.clf[1].weight.mul_(0.1)
    state = ref.state_dict()
    assert any(k.endswith(('.attention.attn.in_proj_weight', 'vquantizer.codebook.weight')) for k in state)
    content = {entry: state, 'optimizer_state_dict': {'state': {}, 'param_groups': []}}
    if entry == 'ema_state_dict':  # the training weights beside the EMA ones: the EMA ones must be read
        content['state_dict'] = {k: torch.zeros_like(v) for k, v in state.items()}
    torch.save(content, tmp_path / 'model.pt')
    config = dict(ref.config)
    module, variables = convert.original.load_original(str(tmp_path / 'model.pt'), component, config)
    converted = make().eval()
    converted.load_state_dict(
        {
            k: torch.from_numpy(v)
            for k, v in convert.core.state_dict_from_variables(module, component, variables).items()
        }
    )
    for ours, expected in zip(_torch_outputs(component, converted), _torch_outputs(component, ref), strict=True):
        assert rel_err(ours, expected) <= TOL
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / 'model.safetensors')
    _, flat = convert.original.load_original(str(tmp_path / 'model.safetensors'), component, config)
    jax.tree.map(np.testing.assert_array_equal, flat, variables)


def test_original_checkpoint_errors(tmp_path):
    torch.save({'optimizer': {}}, tmp_path / 'stage_c.pt')
    with pytest.raises(KeyError, match='ema_state_dict or state_dict'):
        convert.original.read_checkpoint(str(tmp_path / 'stage_c.pt'), 'prior')
    with pytest.raises(FileNotFoundError, match='missing.pt'):
        convert.original.load_original(str(tmp_path / 'missing.pt'), 'prior')


def test_full_size_prior_param_count():
    import flax.linen as nn

    flax_module = convert.core.COMPONENTS['prior'].from_config(
        dict(c_in=16, c=1536, c_cond=1280, c_r=64, depth=32, nhead=24, dropout=0.1)
    )
    shapes = jax.eval_shape(
        lambda k: flax_module.init(k, jnp.zeros((1, 24, 24, 16)), jnp.zeros((1,)), jnp.zeros((1, 77, 1280))),
        jax.random.key(0),
    )
    assert sum(x.size for x in jax.tree.leaves(nn.meta.unbox(shapes['params']))) == 993_636_896


def test_full_size_decoder_param_count():
    import flax.linen as nn

    module = convert.core.component('decoder').from_config({})  # the released Würstchen v2 decoder
    shapes = jax.eval_shape(
        lambda k: module.init(
            k, jnp.zeros((1, 16, 16, 4)), jnp.zeros((1,)), jnp.zeros((1, 3, 3, 16)), jnp.zeros((1, 77, 1024))
        ),
        jax.random.key(0),
    )
    assert sum(x.size for x in jax.tree.leaves(nn.meta.unbox(shapes['params']))) == 1_055_365_280


@pytest.mark.parametrize(
    'src, dst',
    [((12, 8), (32, 20)), ((24, 24), (16, 16)), ((13, 9), (5, 30)), ((7, 7), (7, 7))],
    ids=['up', 'down', 'mixed', 'same'],
)
@pytest.mark.parametrize('method', ['bicubic_antialias', 'bilinear'])
def test_resize_matches_torch(src, dst, method):
    from wurst_jax.models.resize import resize

    x = np.random.default_rng(0).standard_normal((2, *src, 3)).astype(np.float32)
    mode = dict(mode='bicubic', antialias=True) if method == 'bicubic_antialias' else dict(mode='bilinear')
    expected = nhwc(torch.nn.functional.interpolate(nchw(x), size=dst, align_corners=True, **mode))
    assert rel_err(resize(jnp.asarray(x), dst, method), expected) <= TOL


def test_cli_round_trip(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    ref = randomise(WuerstchenPrior(**PRIOR_CONFIGS[0]), seed=4)
    ref.save_pretrained(tmp_path / 'diffusers')
    run = lambda *a: subprocess.run(
        [sys.executable, '-m', 'wurst_jax.convert', '--component=prior', *a],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    first = run(f'--src={tmp_path / "diffusers"}', f'--dst={tmp_path / "flax"}')
    assert first.returncode == 0, first.stderr[-2000:]
    second = run(f'--src={tmp_path / "flax"}', f'--dst={tmp_path / "back"}', '--to=diffusers')
    assert second.returncode == 0, second.stderr[-2000:]
    back = WuerstchenPrior.from_pretrained(tmp_path / 'back')
    for (name, a), (_, b) in zip(ref.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize('size,dim', [(8, 128), (5, 12)])
def test_sincos_2d_matches_diffusers(size, dim):
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    from wurst_jax.models import layers

    ref = get_2d_sincos_pos_embed(dim, size, base_size=size, output_type='np')  # [size * size, dim], row-major
    np.testing.assert_allclose(np.asarray(layers.sincos_2d(size, size, dim)).reshape(-1, dim), ref, atol=1e-6)


def test_prior_with_pos_embed_does_not_convert(tmp_path):
    from wurst_jax.models.stage_c import WuerstchenPrior as FlaxPrior

    prior = FlaxPrior(c_in=4, c=16, c_cond=8, c_r=8, depth=1, num_heads=2, pos_embed=True)
    variables = prior.init(jax.random.key(0), jnp.zeros((1, 4, 4, 4)), jnp.zeros((1,)), jnp.zeros((1, 3, 8)))
    with pytest.raises(ValueError, match='pos_embed'):
        convert.save_diffusers(prior, variables, str(tmp_path), 'prior')


@pytest.mark.parametrize('factor', [2, 3])
def test_pixel_shuffles_match_torch(factor):
    from wurst_jax.models import layers

    x = np.random.default_rng(0).standard_normal((2, 6 * factor, 4 * factor, 5)).astype(np.float32)
    ref = torch.nn.PixelUnshuffle(factor)(nchw(x)).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(np.asarray(layers.pixel_unshuffle(jnp.asarray(x), factor)), ref)
    back = torch.nn.PixelShuffle(factor)(torch.from_numpy(ref.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_array_equal(
        np.asarray(layers.pixel_shuffle(jnp.asarray(ref), factor)), back.transpose(0, 2, 3, 1)
    )


@pytest.mark.parametrize('kernel, stride, padding', [(4, 2, 1), (2, 2, 0)])
def test_conv_transpose_matches_torch(kernel, stride, padding):
    from wurst_jax.models import layers

    ref = torch.nn.ConvTranspose2d(6, 5, kernel, stride=stride, padding=padding)
    x = np.random.default_rng(1).standard_normal((2, 5, 7, 6)).astype(np.float32)
    with torch.no_grad():
        expected = ref(nchw(x)).numpy().transpose(0, 2, 3, 1)
    module = layers.conv_transpose(5, (kernel, kernel), strides=stride, torch_padding=padding)
    params = {'kernel': ref.weight.detach().numpy().transpose(2, 3, 1, 0), 'bias': ref.bias.detach().numpy()}
    assert rel_err(module.apply({'params': params}, x), expected) <= TOL
