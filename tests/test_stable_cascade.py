"""Stable Cascade's UNet against diffusers' StableCascadeUNet: both configurations, conversion both ways,
the original files, and the released sizes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models import StableCascadeUNet as TorchUNet
from safetensors.numpy import save_file

from torch_reference import TOL, nchw, nhwc, randomise, rel_err
from wurst_jax import convert
from wurst_jax.convert.original import original_names
from wurst_jax.models.stable_cascade import RELEASED, StableCascadeUNet

RES, TIME, ATTN = 'SDCascadeResBlock', 'SDCascadeTimestepBlock', 'SDCascadeAttnBlock'

PRIOR = dict(  # Stage C's layout: two levels at one resolution, text + pooled text + image tokens
    in_channels=6,
    out_channels=6,
    timestep_ratio_embedding_dim=16,
    conditioning_dim=24,
    block_out_channels=(16, 24),
    num_attention_heads=(2, 3),
    down_num_layers_per_block=(1, 2),
    up_num_layers_per_block=(2, 1),
    down_blocks_repeat_mappers=(1, 1),
    up_blocks_repeat_mappers=(1, 1),
    block_types_per_layer=((RES, TIME, ATTN), (RES, TIME, ATTN)),
    clip_text_in_channels=10,
    clip_text_pooled_in_channels=12,
    clip_image_in_channels=8,
    clip_seq=2,
    dropout=(0.1, 0.1),
    timestep_conditioning_type=('sca', 'crp'),
    switch_level=(False,),
)
DECODER = dict(  # Stage B's layout: effnet and pixels mappers, k2/s2 steps, repeated levels on the way up
    in_channels=4,
    out_channels=4,
    timestep_ratio_embedding_dim=16,
    patch_size=2,
    conditioning_dim=20,
    block_out_channels=(8, 12, 16),
    num_attention_heads=(0, 2, 4),
    down_num_layers_per_block=(1, 1, 2),
    up_num_layers_per_block=(2, 1, 1),
    down_blocks_repeat_mappers=(1, 2, 1),
    up_blocks_repeat_mappers=(3, 2, 2),
    block_types_per_layer=((RES, TIME), (RES, TIME, ATTN), (RES, TIME, ATTN)),
    clip_text_pooled_in_channels=12,
    clip_seq=3,
    effnet_in_channels=5,
    pixel_mapper_in_channels=3,
    dropout=(0.0, 0.1, 0.1),
    timestep_conditioning_type=('sca',),
)
SMALL_DECODER = dict(  # two levels of it, for the slower tests
    DECODER,
    block_out_channels=(8, 16),
    num_attention_heads=(0, 4),
    down_num_layers_per_block=(1, 2),
    up_num_layers_per_block=(2, 1),
    down_blocks_repeat_mappers=(1, 1),
    up_blocks_repeat_mappers=(2, 1),
    block_types_per_layer=((RES, TIME), (RES, TIME, ATTN)),
    dropout=(0.0, 0.1),
)
RESAMPLED = dict(
    PRIOR, block_out_channels=(16, 16), num_attention_heads=(2, 2), switch_level=(True,)
)  # switch_level's bilinear resizes


def _torch_unet(cfg: dict) -> TorchUNet:
    return TorchUNet(**{k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()})


def _torch_model(cfg: dict, seed: int) -> TorchUNet:
    return randomise(_torch_unet(cfg), seed=seed)


def _inputs(cfg: dict, rng, batch: int, height: int, width: int) -> dict[str, np.ndarray]:
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    inputs = dict(
        x=normal(batch, height, width, cfg['in_channels']),
        r=np.linspace(0.01, 1.0, batch).astype(np.float32),  # at r ~ 1 the embedding's angles reach 1e4 rad
        clip_text_pooled=normal(batch, 1, cfg['clip_text_pooled_in_channels']),
    )
    if cfg.get('clip_text_in_channels'):
        inputs.update(clip_text=normal(batch, 5, cfg['clip_text_in_channels']))
        inputs.update(clip_img=normal(batch, 2, cfg['clip_image_in_channels']))
    if cfg.get('effnet_in_channels'):
        inputs.update(effnet=normal(batch, 3, 5, cfg['effnet_in_channels']))
    return inputs


def _torch_outputs(model: TorchUNet, inputs: dict, **extra) -> np.ndarray:
    to_torch = lambda k, v: nchw(v) if k in ('x', 'effnet', 'pixels') else torch.from_numpy(v)
    args = {k: to_torch(k, v) for k, v in {**inputs, **extra}.items()}
    args['sample'], args['timestep_ratio'] = args.pop('x'), args.pop('r')
    with torch.no_grad():
        return nhwc(model(**args).sample)


def _ours(module, variables, inputs: dict, **extra) -> np.ndarray:
    args = {**inputs, **extra}
    return np.asarray(jax.jit(lambda v, a: module.apply(v, **a))(variables, args))


@pytest.mark.parametrize(
    'cfg, size',
    [(PRIOR, (6, 10)), (DECODER, (16, 24)), (DECODER, (20, 12)), (RESAMPLED, (8, 12))],
    ids=['stage_c', 'stage_b', 'stage_b_odd_levels', 'switch_level_resize'],
)
def test_matches_diffusers(tmp_path, cfg, size):
    """Non-square latents; (20, 12) halves to an odd 5 x 3 at the deepest level, so the way up resizes to the skips."""
    ref = _torch_model(cfg, seed=3)
    ref.save_pretrained(tmp_path)
    module, variables = convert.load_diffusers(str(tmp_path), 'stable_cascade_unet')
    inputs = _inputs(cfg, np.random.default_rng(4), 3, *size)
    assert rel_err(_ours(module, variables, inputs), _torch_outputs(ref, inputs)) <= TOL
    if cfg is DECODER:  # the pixel map when given, not the zeros default
        pixels = np.random.default_rng(5).standard_normal((3, 8, 8, 3)).astype(np.float32)
        expected = _torch_outputs(ref, inputs, pixels=pixels)
        assert rel_err(_ours(module, variables, inputs, pixels=pixels), expected) <= TOL


@pytest.mark.parametrize('cfg', [PRIOR, SMALL_DECODER], ids=['stage_c', 'stage_b'])
def test_scan_blocks_and_remat_compute_the_same(tmp_path, cfg):
    """scan_blocks stacks each level's repeated block lists (an up level's first, skip-taking pass apart) and
    converts both ways; with remat the gradient is the same."""
    ref = _torch_model(cfg, seed=12)
    ref.save_pretrained(tmp_path)
    module, variables = convert.load_diffusers(str(tmp_path), 'stable_cascade_unet')
    scanned, scanned_vars = convert.load_diffusers(str(tmp_path), 'stable_cascade_unet', scan_blocks=True)
    assert any(name.endswith('_scan') for name in scanned_vars['params'])
    inputs = _inputs(cfg, np.random.default_rng(13), 2, 16, 8)
    expected = _ours(module, variables, inputs)
    np.testing.assert_allclose(_ours(scanned, scanned_vars, inputs), expected, atol=1e-5 * np.abs(expected).max())
    convert.save_diffusers(scanned, scanned_vars, str(tmp_path / 'back'), 'stable_cascade_unet')
    _, back = convert.load_diffusers(str(tmp_path / 'back'), 'stable_cascade_unet')
    jax.tree.map(np.testing.assert_array_equal, back, variables)

    def grads(m, v):
        loss = lambda p: jnp.mean(jnp.square(m.apply({'params': p}, **inputs)))
        return jax.jit(jax.grad(loss))(v['params'])

    remat = scanned.clone(remat_policy='full')
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        grads(remat, scanned_vars),
        grads(scanned, scanned_vars),
    )


def test_sca_and_crp_conditions_match_diffusers(tmp_path):
    # diffusers reads the extra conditions with `cond or zeros`, which takes one value only: batch 1.
    ref = _torch_model(PRIOR, seed=6)
    ref.save_pretrained(tmp_path)
    module, variables = convert.load_diffusers(str(tmp_path), 'stable_cascade_unet')
    inputs = _inputs(PRIOR, np.random.default_rng(7), 1, 4, 4)
    extra = dict(sca=np.array([0.3], np.float32), crp=np.array([0.8], np.float32))
    ours = _ours(module, variables, inputs, **extra)
    assert rel_err(ours, _torch_outputs(ref, inputs, **extra)) <= TOL
    assert not np.allclose(ours, _ours(module, variables, inputs))  # the conditions do enter


def test_round_trip_loads_in_diffusers(tmp_path):
    """Flax -> diffusers folder: diffusers computes the same; folder -> Flax is bit-exact."""
    module = StableCascadeUNet(**DECODER)
    inputs = _inputs(DECODER, np.random.default_rng(8), 2, 8, 16)
    variables = nn.meta.unbox(jax.jit(module.init)(jax.random.key(0), **inputs))
    # Random everywhere: init zeroes the head and the FiLM mappers, which would hide mistakes.
    leaves, tree = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    variables = jax.tree.unflatten(tree, [np.array(0.2 * jax.random.normal(k, x.shape)) for k, x in zip(keys, leaves)])
    convert.save_diffusers(module, variables, str(tmp_path / 'unet'), 'stable_cascade_unet')
    ref = TorchUNet.from_pretrained(tmp_path / 'unet').eval()
    assert rel_err(_ours(module, variables, inputs), _torch_outputs(ref, inputs)) <= TOL
    back_module, back = convert.load_diffusers(str(tmp_path / 'unet'), 'stable_cascade_unet')
    assert back_module == module
    jax.tree.map(np.testing.assert_array_equal, back, variables)


@pytest.mark.parametrize('cfg', [PRIOR, DECODER], ids=['stage_c', 'stage_b'])
def test_original_file_loads(tmp_path, cfg):
    """A stage_c/stage_b file in the official names (joined in_proj; Stage B's `clip_mapper`) gives the same network."""
    ref = _torch_model(cfg, seed=9)
    state = original_names({k: v.numpy() for k, v in ref.state_dict().items()})
    if cfg is DECODER:
        state['clip_mapper.weight'] = state.pop('clip_txt_pooled_mapper.weight')
        state['clip_mapper.bias'] = state.pop('clip_txt_pooled_mapper.bias')
    assert any('attention.attn.in_proj_weight' in k for k in state)
    path = str(tmp_path / 'stage.safetensors')
    save_file(state, path)
    module, variables = convert.load_original(path, 'stable_cascade_unet', config=cfg)
    inputs = _inputs(cfg, np.random.default_rng(10), 2, 8, 8)
    assert rel_err(_ours(module, variables, inputs), _torch_outputs(ref, inputs)) <= TOL


# Parameters of the released files (Stability-AI/StableCascade stage_{c,b}{,_lite}.safetensors).
RELEASED_COUNTS = {
    'stage_c': 3_589_103_632,
    'stage_c_lite': 1_030_785_040,
    'stage_b': 1_562_941_136,
    'stage_b_lite': 699_471_248,
}


@pytest.mark.parametrize('name', sorted(RELEASED))
def test_released_sizes_count_as_diffusers(name):
    cfg = RELEASED[name]
    module = StableCascadeUNet(**cfg)
    inputs = convert.core.COMPONENTS['stable_cascade_unet'].example_inputs(module)
    shapes = jax.eval_shape(lambda k: module.init(k, *inputs), jax.random.key(0))
    ours = sum(x.size for x in jax.tree.leaves(nn.meta.unbox(shapes['params'])))
    with torch.device('meta'):
        theirs = sum(p.numel() for p in _torch_unet(cfg).parameters())
    assert ours == theirs == RELEASED_COUNTS[name]


def test_bad_conditioning_is_named():
    module = StableCascadeUNet(**PRIOR)
    inputs = _inputs(PRIOR, np.random.default_rng(11), 1, 4, 4)
    with pytest.raises(ValueError, match='clip_text and clip_img together'):
        module.init(jax.random.key(0), **{**inputs, 'clip_img': None})
    decoder = StableCascadeUNet(**DECODER)
    with pytest.raises(ValueError, match='clip_text_in_channels'):
        decoder.init(
            jax.random.key(0),
            **_inputs(DECODER, np.random.default_rng(12), 1, 8, 8),
            **{'clip_text': inputs['clip_text'], 'clip_img': inputs['clip_img']},
        )
    with pytest.raises(ValueError, match='up_num_layers_per_block has 1 entries'):
        StableCascadeUNet(**{**PRIOR, 'up_num_layers_per_block': (1,)}).init(jax.random.key(0), **inputs)
    with pytest.raises(ValueError, match='without effnet_in_channels'):
        module.init(jax.random.key(0), **inputs, effnet=np.zeros((1, 2, 2, 5), np.float32))


def _tiny_stage_c_folder(path, text_width: int, latent_channels: int) -> None:
    cfg = dict(
        PRIOR,
        in_channels=latent_channels,
        out_channels=latent_channels,
        clip_text_in_channels=text_width,
        clip_text_pooled_in_channels=text_width,
        dropout=(0.0, 0.0),
    )
    model = _torch_model(cfg, seed=14)
    with torch.no_grad():
        model.clf[1].weight.mul_(0.05)
    model.save_pretrained(path)


def test_stage_c_recipe_finetunes_a_converted_prior(finetune_arg, tmp_path):
    """configs/stable_cascade_c.py on a tiny random StableCascadeUNet folder: it trains from those weights,
    checkpoints and samples; a Stage B folder as init.prior is refused naming it."""
    from conftest import small_prior_run_config
    from wurst_jax import checkpoint, config_lib, tasks, train

    _tiny_stage_c_folder(tmp_path / 'prior', text_width=32, latent_channels=4)
    arg = ','.join([f'prior={tmp_path / "prior"}', *finetune_arg.split(',')[1:]])
    config = small_prior_run_config('stable_cascade_c', arg, tmp_path / 'data')
    tasks.validate(config)
    train.train_and_evaluate(config, str(tmp_path / 'run'))
    _, state = checkpoint.load_trained(str(tmp_path / 'run'))
    assert int(state['step']) == 2
    _, pretrained = convert.load_diffusers(str(tmp_path / 'prior'), 'stable_cascade_unet', scan_blocks=True)
    deltas = jax.tree.leaves(
        jax.tree.map(
            lambda a, b: float(np.abs(np.asarray(a) - b).max()), state['params']['prior'], pretrained['params']
        )
    )
    assert 0 < max(deltas) < 1e-2  # two AdamW steps at 1e-4 from the converted weights
    assert list((tmp_path / 'run').rglob('*.png')), 'the run wrote no sample images'

    decoder = _torch_model(DECODER, seed=15)
    decoder.save_pretrained(tmp_path / 'decoder')
    config.init.prior = str(tmp_path / 'decoder')
    with pytest.raises(config_lib.ConfigError, match='init.prior'):
        tasks.create(config)


def test_lora_on_the_unet_starts_as_the_base_and_merges(tmp_path):
    """Adapters on the scanned UNet's attention, feed-forward and 1x1 convs (its effnet and pixel mappers too):
    at init the output is the base's bit for bit; trained ones merge into the same function."""
    import ml_collections

    from wurst_jax import lora

    ref = _torch_model(SMALL_DECODER, seed=16)
    ref.save_pretrained(tmp_path)
    module, variables = convert.load_diffusers(str(tmp_path), 'stable_cascade_unet', scan_blocks=True)
    inputs = _inputs(SMALL_DECODER, np.random.default_rng(17), 2, 8, 8)
    boxed = jax.jit(module.init)(jax.random.key(0), **inputs)['params']
    config = ml_collections.ConfigDict(dict(lora=dict(rank=2, targets='attention,feed_forward,conv1x1')))
    adapters = lora.init_adapters(jax.random.key(1), {'prior': boxed}, config)['prior']
    adapters = nn.meta.unbox(adapters)
    assert {'effnet_mapper_0', 'pixels_mapper_2', 'clf_1', 'up_blocks_0_scan'} <= set(adapters)
    base = _ours(module, variables, inputs)
    with lora.adapted(1.0):
        np.testing.assert_array_equal(
            _ours(module, {'params': lora.attach(variables['params'], adapters)}, inputs), base
        )
    trained = jax.tree.map(lambda a: np.array(0.3 * jax.random.normal(jax.random.key(a.size), a.shape)), adapters)
    with lora.adapted(1.0):
        adapted = _ours(module, {'params': lora.attach(variables['params'], trained)}, inputs)
    merged = _ours(module, {'params': lora.merge(variables['params'], trained, 1.0)}, inputs)
    assert np.abs(adapted - base).max() > 1e-3
    np.testing.assert_allclose(adapted, merged, atol=1e-4 * np.abs(merged).max())
