"""PixArt-α against diffusers' PixArtTransformer2DModel: random tiny configs with and without the
size micro-conditions, non-square latents, padded text; conversion both ways; scanned blocks; the
re-parameterised start from diffusers' DiTTransformer2DModel."""

import json

import jax
import numpy as np
import pytest
import torch
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

from torch_reference import TOL, nchw, original_pixart_state, randomise, rel_err
from wurst_jax import convert
from wurst_jax.convert.dit import pixart_from_dit

CONFIGS = {
    'plain': dict(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        caption_channels=12,
        cross_attention_dim=16,
        use_additional_conditions=False,
    ),
    # PixArtMS: size and aspect micro-conditions, interpolation_scale 2, patch 1, no learned variance.
    'ms': dict(
        num_attention_heads=3,
        attention_head_dim=8,
        in_channels=3,
        out_channels=3,
        num_layers=3,
        sample_size=6,
        patch_size=1,
        caption_channels=10,
        cross_attention_dim=24,
        use_additional_conditions=True,
        interpolation_scale=2,
    ),
}


def random_pixart(cfg: dict, seed: int) -> PixArtTransformer2DModel:
    """Random weights; the fixed sin-cos position buffer (not in the state dict) stays as built."""
    model = PixArtTransformer2DModel(**cfg)
    positions = model.pos_embed.pos_embed.clone()
    randomise(model, seed)
    with torch.no_grad():
        model.pos_embed.pos_embed.copy_(positions)
    return model


def pixart_inputs(cfg: dict, h: int, w: int, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    mask = np.ones((4, 5), np.int64)
    mask[1, 3:] = 0  # the second caption has 3 tokens
    inputs = dict(
        x=rng.standard_normal((4, h, w, cfg['in_channels'])).astype(np.float32),
        t=np.array([10.0, 500.0, 900.0, 1000.0], np.float32),  # at t ~ 1000 the angles reach 1e3 rad
        mask=mask,
        text=rng.standard_normal((4, 5, cfg['caption_channels'])).astype(np.float32),
    )
    if cfg['use_additional_conditions']:
        inputs.update(
            resolution=np.array([[48.0, 64.0], [64.0, 40.0], [32.0, 96.0], [1024.0, 768.0]], np.float32),
            aspect_ratio=np.array([[0.75], [1.6], [3.0], [0.75]], np.float32),
        )
    return inputs


def torch_forward(ref, inputs) -> np.ndarray:
    added = (
        {'resolution': torch.from_numpy(inputs['resolution']), 'aspect_ratio': torch.from_numpy(inputs['aspect_ratio'])}
        if 'resolution' in inputs
        else None
    )
    with torch.no_grad():
        out = ref(
            nchw(inputs['x']),
            encoder_hidden_states=torch.from_numpy(inputs['text']),
            timestep=torch.from_numpy(inputs['t']),
            encoder_attention_mask=torch.from_numpy(inputs['mask']),
            added_cond_kwargs=added,
        ).sample
    return out.numpy().transpose(0, 2, 3, 1)


def flax_forward(module, variables, inputs) -> np.ndarray:
    extra = (inputs['resolution'], inputs['aspect_ratio']) if 'resolution' in inputs else ()
    return np.asarray(
        jax.jit(module.apply)(variables, inputs['x'], inputs['t'], inputs['text'], inputs['mask'], *extra)
    )


@pytest.mark.parametrize('name', list(CONFIGS))
@pytest.mark.parametrize('size', [(8, 8), (6, 10)], ids=['base_grid', 'non_square'])
def test_pixart_matches_diffusers(tmp_path, name, size):
    cfg = CONFIGS[name]
    ref = random_pixart(cfg, seed=0)
    ref.save_pretrained(tmp_path)
    module, variables = convert.load_diffusers(str(tmp_path), 'pixart')
    assert module.use_additional_conditions == cfg['use_additional_conditions']
    inputs = pixart_inputs(cfg, *size)
    ours = flax_forward(module, variables, inputs)
    assert rel_err(ours, torch_forward(ref, inputs)) <= TOL
    # The padded caption's masked tokens do not matter; the kept ones do.
    changed = dict(inputs, text=inputs['text'].copy())
    changed['text'][1, 3:] += 5.0
    np.testing.assert_allclose(flax_forward(module, variables, changed)[1], ours[1], rtol=1e-6, atol=1e-6)
    changed['text'][1, 0] += 5.0
    assert not np.allclose(flax_forward(module, variables, changed)[1], ours[1], atol=1e-3)


def test_pixart_round_trip_and_scanned_blocks(tmp_path):
    cfg = CONFIGS['ms']
    ref = random_pixart(cfg, seed=2)
    ref.save_pretrained(tmp_path / 'in')
    module, variables = convert.load_diffusers(str(tmp_path / 'in'), 'pixart')
    convert.save_diffusers(module, variables, str(tmp_path / 'out'), 'pixart')
    back = PixArtTransformer2DModel.from_pretrained(tmp_path / 'out').eval()
    for key, tensor in ref.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], tensor, rtol=0, atol=0)
    scanned, scanned_vars = convert.load_diffusers(str(tmp_path / 'in'), 'pixart', scan_blocks=True)
    inputs = pixart_inputs(cfg, 6, 6)
    np.testing.assert_allclose(
        flax_forward(scanned, scanned_vars, inputs), flax_forward(module, variables, inputs), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize('name', list(CONFIGS))
def test_original_pixart_checkpoint_loads_like_diffusers(tmp_path, name):
    cfg = CONFIGS[name]
    ref = random_pixart(cfg, seed=5)
    ref.save_pretrained(tmp_path / 'diffusers')
    torch.save({'state_dict': original_pixart_state(ref, 6), 'epoch': 1}, tmp_path / 'PixArt.pth')
    config = json.loads((tmp_path / 'diffusers' / 'config.json').read_text())
    module, variables = convert.original.load_original(str(tmp_path / 'PixArt.pth'), 'pixart', config)
    _, expected = convert.load_diffusers(str(tmp_path / 'diffusers'), 'pixart')
    jax.tree.map(np.testing.assert_array_equal, variables, expected)
    inputs = pixart_inputs(cfg, 6, 10)
    assert rel_err(flax_forward(module, variables, inputs), torch_forward(ref, inputs)) <= TOL
    # A module whose positions differ from the file's is refused, naming the scale the file was made with.
    scale = ref.pos_embed.interpolation_scale
    with pytest.raises(ValueError, match=f'matches interpolation_scale=\\[{float(scale)}\\]'):
        convert.original.load_original(
            str(tmp_path / 'PixArt.pth'), 'pixart', {**config, 'interpolation_scale': 2 * scale}
        )


def test_pixart_refuses_unsupported_configs(tmp_path):
    PixArtTransformer2DModel(**{**CONFIGS['plain'], 'norm_elementwise_affine': True}).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match='norm_elementwise_affine=True is not supported'):
        convert.load_diffusers(str(tmp_path), 'pixart')


def test_pixart_from_dit_equals_unconditional_dit_at_the_chosen_timestep(tmp_path):
    # norm_eps 1e-6 as in the original DiT and in PixArt (diffusers' DiT default of 1e-5 in the MLP's
    # norm alone moves the output by ~1e-5).
    cfg = dict(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=3,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_eps=1e-6,
    )
    dit = DiTTransformer2DModel(**cfg)
    positions = dit.pos_embed.pos_embed.clone()
    randomise(dit, seed=3)
    with torch.no_grad():
        dit.pos_embed.pos_embed.copy_(positions)
        for block in dit.transformer_blocks:  # DiT without its class embedding
            block.norm1.emb.class_embedder.embedding_table.weight.zero_()
    dit.save_pretrained(tmp_path)
    module, variables = pixart_from_dit(str(tmp_path), caption_channels=12, t=500.0)

    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)

    def both(t, text):
        with torch.no_grad():
            ref = dit(nchw(x), timestep=torch.full((2,), t), class_labels=torch.tensor([1, 10])).sample
        ours = jax.jit(module.apply)(variables, x, np.full(2, t, np.float32), text, np.ones((2, 6), bool))
        return np.asarray(ours), ref.numpy().transpose(0, 2, 3, 1)

    text = rng.standard_normal((2, 6, 12)).astype(np.float32)
    ours, ref = both(500.0, text)
    assert rel_err(ours, ref) <= TOL
    np.testing.assert_array_equal(both(500.0, 3 * text + 1)[0], ours)  # any text: cross-attention is zero
    assert rel_err(*both(100.0, text)) > 1e-3  # adaLN-single is DiT's only at the chosen timestep
