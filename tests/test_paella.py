"""Würstchen v1's Stage B (Paella token predictor): parity with the official module tree through the
checkpoint loader, the export back to official names, the official init, and bad input."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from safetensors.torch import load_file

from paella_reference import TorchPaella
from torch_reference import TOL, nchw, randomise, rel_err
from wurst_jax import convert
from wurst_jax.convert import core
from wurst_jax.models.paella import Paella

CONFIGS = [
    # Two levels, the released level layout (CT then CTA), two repeats at the deepest level.
    dict(
        c_in=16,
        c_out=16,
        num_labels=64,
        c_r=64,
        c_cond=32,
        c_hidden=[32, 64],
        nhead=[-1, 2],
        blocks=[1, 2],
        level_config=['CT', 'CTA'],
        effnet_embd=16,
        byt5_embd=24,
        dropout=0.0,
    ),
    # Three levels, odd c_r (zero-padded embedding), 5x5 depthwise, patch size 1, per-level dropout, a middle
    # level starting with 'T' (its up level then takes no skip, as the official forward), attention at level 0.
    dict(
        c_in=8,
        c_out=8,
        num_labels=40,
        c_r=15,
        patch_size=1,
        c_cond=20,
        c_hidden=[16, 24, 32],
        nhead=[2, -1, 4],
        blocks=[2, 1, 2],
        level_config=['CTA', 'TC', 'CTA'],
        effnet_embd=5,
        byt5_embd=12,
        kernel_size=5,
        dropout=[0.0, 0.0, 0.0],
    ),
]


def inputs(cfg, with_text=True, seed=1):
    rng = np.random.default_rng(seed)
    unit = cfg.get('patch_size', 2) * 2 ** (len(cfg['c_hidden']) - 1)
    tokens = rng.integers(0, cfg['num_labels'], (3, 4 * unit, 3 * unit)).astype(np.int32)  # non-square
    r = np.array([0.01, 0.5, 1.0], np.float32)  # at r ~ 1 the embedding's angles reach 1e4 rad
    effnet = rng.standard_normal((3, 3, 2, cfg['effnet_embd'])).astype(np.float32)
    text = rng.standard_normal((3, 5, cfg['byt5_embd'])).astype(np.float32) if with_text else None
    return tokens, r, effnet, text


def torch_logits(ref, tokens, r, effnet, text):
    with torch.no_grad():
        out = ref(
            torch.from_numpy(tokens.astype(np.int64)),
            torch.from_numpy(r),
            nchw(effnet),
            None if text is None else torch.from_numpy(text),
        )
    return out.numpy().transpose(0, 2, 3, 1)


def save_checkpoint(path, ref):
    """As dome272/Wuerstchen train_stage_B.py saves it: the generator, its EfficientNet, the optimizer."""
    effnet = {'mapper.0.weight': torch.zeros(16, 1280, 1, 1)}
    torch.save(
        {
            'state_dict': ref.state_dict(),
            'effnet_state_dict': effnet,
            'optimizer_state_dict': {'state': {}, 'param_groups': []},
            'scheduler_last_step': 7,
        },
        path,
    )


@pytest.mark.parametrize(
    'cfg, with_text', [(CONFIGS[0], True), (CONFIGS[1], False)], ids=['two_levels', 'three_levels_no_text']
)
def test_matches_official_through_load_original(tmp_path, cfg, with_text):
    ref = randomise(TorchPaella(**cfg), seed=0)
    state = ref.state_dict()
    # The official names: one MultiheadAttention per AttnBlock, the skip-taking depthwise conv 2C -> C.
    assert 'up_blocks.0.2.attention.attn.in_proj_weight' in state and 'in_mapper.0.weight' in state
    assert state['out_mapper.1.weight'].shape == (cfg['num_labels'], cfg['c_out'], 1, 1)
    save_checkpoint(tmp_path / 'model_stage_b.pt', ref)
    x = inputs(cfg, with_text)
    expected = torch_logits(ref, *x)
    module, variables = convert.load_original(str(tmp_path / 'model_stage_b.pt'), 'paella', cfg)
    assert module == Paella(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})
    ours = jax.jit(module.apply)(variables, *x)
    assert ours.dtype == jnp.float32 and ours.shape == expected.shape
    assert rel_err(ours, expected) <= TOL
    if not with_text:  # the same checkpoint into the scanned module: stacked repeats, the same logits
        scanned, scanned_vars = convert.load_original(
            str(tmp_path / 'model_stage_b.pt'), 'paella', cfg, scan_blocks=True
        )
        assert {'down_blocks_0_scan', 'up_blocks_0_scan', 'up_blocks_2_scan'} <= set(scanned_vars['params'])
        assert rel_err(jax.jit(scanned.apply)(scanned_vars, *x), expected) <= TOL


def test_export_round_trip_is_bit_exact(tmp_path):
    cfg = CONFIGS[1]
    ref = randomise(TorchPaella(**cfg), seed=2)
    save_checkpoint(tmp_path / 'model.pt', ref)
    for scan in (False, True):
        module, variables = convert.load_original(str(tmp_path / 'model.pt'), 'paella', cfg, scan_blocks=scan)
        out = tmp_path / f'paella_{scan}.safetensors'
        convert.save_original(module, variables, str(out), 'paella')
        _, back = convert.load_original(str(out), 'paella', cfg, scan_blocks=scan)
        jax.tree.map(np.testing.assert_array_equal, back, variables)
        # The file holds the official state dict: the torch module loads it strictly, every tensor bit-exact.
        exported = load_file(out)
        fresh = TorchPaella(**cfg)
        fresh.load_state_dict(exported, strict=True)
        for key, value in ref.state_dict().items():
            torch.testing.assert_close(exported[key], value, rtol=0, atol=0)


def test_scanned_rematerialised_gradients_match_official(tmp_path):
    """What training differentiates: the token cross-entropy's gradient through scan_blocks with full remat is
    torch autograd's through the official module, tensor by tensor (the scanned params written back unscanned)."""
    cfg = CONFIGS[0]
    ref = randomise(TorchPaella(**cfg), seed=3)
    save_checkpoint(tmp_path / 'model.pt', ref)
    tokens, r, effnet, text = inputs(cfg)
    module, variables = convert.load_original(
        str(tmp_path / 'model.pt'), 'paella', cfg, scan_blocks=True, remat_policy='full'
    )

    def loss(params):
        logits = module.apply({'params': params}, tokens, r, effnet, text)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], axis=-1))

    value, grads = jax.jit(jax.value_and_grad(loss))(variables['params'])
    ref.zero_grad()
    logits = ref(torch.from_numpy(tokens.astype(np.int64)), torch.from_numpy(r), nchw(effnet), torch.from_numpy(text))
    expected = torch.nn.functional.cross_entropy(logits, torch.from_numpy(tokens.astype(np.int64)))
    expected.backward()
    np.testing.assert_allclose(value, expected.item(), rtol=1e-5)
    ours = convert.original.original_names(core.state_dict_from_variables(module, 'paella', {'params': grads}))
    theirs = {k: p.grad.numpy() for k, p in ref.named_parameters()}
    assert set(ours) == set(theirs)
    for key, grad in theirs.items():
        assert rel_err(ours[key], grad) <= 1e-4, (key, rel_err(ours[key], grad))


def test_init_is_official():
    """The Flax initialisers draw what the official constructor draws: the same zero tensors, the logits conv a copy
    of the token embedding, and per tensor the same spread (tensors of 256+ values)."""
    cfg = dict(CONFIGS[0], blocks=[1, 1])
    torch.manual_seed(0)
    ref = TorchPaella(**cfg)
    module = core.component('paella').from_config(cfg)
    variables = jax.jit(module.init)(jax.random.key(0), *inputs(cfg))
    flat = traverse_util.flatten_dict(nn.meta.unbox(variables['params']))
    table = flat[('in_mapper_0', 'embedding')]
    np.testing.assert_array_equal(flat[('out_mapper_1', 'kernel')][0, 0], table.T)
    assert abs(table.std() - math.sqrt(1 / cfg['num_labels'])) < 0.1 * math.sqrt(1 / cfg['num_labels'])
    ours = convert.original.original_names(core.state_dict_from_variables(module, 'paella', variables))
    theirs = {k: v.numpy() for k, v in ref.state_dict().items()}
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        assert (np.abs(ours[key]).max() == 0) == (np.abs(value).max() == 0), key
        if value.size >= 256 and value.std() > 0:
            assert abs(ours[key].std() / value.std() - 1) < 0.25, (key, ours[key].std(), value.std())


def test_full_size_parameter_count():
    """The released v1 Stage B (train_stage_B.py: Paella(byt5_embd=1024)): the official module's count."""
    with torch.device('meta'):
        expected = sum(p.numel() for p in TorchPaella(byt5_embd=1024).parameters())
    module = core.component('paella').from_config(convert.original.RELEASED_CONFIGS['paella'])
    shapes = jax.eval_shape(
        lambda k: module.init(k, *core.component('paella').example_inputs(module)), jax.random.key(0)
    )
    assert sum(x.size for x in jax.tree.leaves(nn.meta.unbox(shapes['params']))) == expected
    assert round(expected / 1e6, 1) == 730.8


def test_bad_input_errors(tmp_path):
    cfg = CONFIGS[0]
    module = core.component('paella').from_config(cfg)
    tokens, r, effnet, text = inputs(cfg)
    shapes = jax.eval_shape(lambda k: module.init(k, tokens, r, effnet, text), jax.random.key(0))
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.meta.unbox(shapes))
    with pytest.raises(ValueError, match=r'effnet_embd=16.*effnet_embd=7'):
        module.apply(params, tokens, r, effnet[..., :7], text)
    with pytest.raises(ValueError, match=r'byt5_embd=24.*byt5_embd=1024'):
        module.apply(params, tokens, r, effnet, np.zeros((3, 5, 1024), np.float32))
    with pytest.raises(ValueError, match='must divide by'):
        module.apply(params, tokens[:, :6], r, effnet, text)
    with pytest.raises(ValueError, match='integer token map'):
        module.apply(params, tokens.astype(np.float32), r, effnet, text)
    with pytest.raises(ValueError, match=r'c_out=8 != c_in=16'):
        Paella(**{**module_fields(cfg), 'c_out': 8}).init(jax.random.key(0), tokens, r, effnet, text)
    with pytest.raises(ValueError, match=r"'c_hiden' \(did you mean 'c_hidden'\?\)"):
        core.component('paella').from_config({**cfg, 'c_hiden': [8]})
    torch.save({'ema_state_dict': {}, 'optimizer_state_dict': {}}, tmp_path / 'model_stage_c.pt')
    with pytest.raises(KeyError) as err:
        convert.load_original(str(tmp_path / 'model_stage_c.pt'), 'paella', cfg)
    message = str(err.value)
    assert 'model_stage_c.pt' in message and "['ema_state_dict', 'optimizer_state_dict']" in message
    assert 'no state_dict entry for paella' in message and 'train_stage_B.py' in message
    with pytest.raises(ValueError, match='not .pixart.'):
        convert.save_original(module, params, str(tmp_path / 'x.safetensors'), 'pixart')


def module_fields(cfg):
    return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
