"""Parity of the Flax T5 encoder with transformers' T5EncoderModel, conversion both ways (single-file and
sharded folders), the T5-v1.1-XXL size, bfloat16, bad folders, and the T5 tokenizer folder."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from conftest import tiny_clip_tokenizer_folder, tiny_t5_tokenizer_folder
from torch_reference import TOL, randomise, rel_err
from wurst_jax import convert
from wurst_jax.convert import core
from wurst_jax.models.t5 import T5Encoder, relative_position_buckets
from wurst_jax.tokenizer import create_tokenizer

# Tiny configs: with 8 buckets only distances 0 and 1 are exact each way, 2..15 are log-spaced, and from
# max_distance 16 on (L = 24) every distance shares the last bucket.
CONFIGS = {
    'relu': dict(
        vocab_size=50,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj='relu',
    ),
    'gated_gelu': dict(
        vocab_size=60,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=3,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj='gated-gelu',
        layer_norm_epsilon=1e-5,
    ),
}
LENGTH = 24


def _batch(vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of different lengths: full, right-padded (two lengths) and left-padded; pads are id 0."""
    rng = np.random.default_rng(seed)
    ids, mask = [], []
    for n, left in [(LENGTH, False), (13, False), (3, False), (9, True)]:
        valid = np.zeros(LENGTH, np.int64)
        valid[slice(LENGTH - n, None) if left else slice(0, n)] = 1
        ids.append(np.where(valid, rng.integers(2, vocab, LENGTH), 0))
        mask.append(valid)
    return np.array(ids), np.array(mask)


def _torch_encoder(cfg: dict, seed: int, cls=transformers.T5EncoderModel):
    return randomise(cls(transformers.T5Config(**cfg)), seed=seed)


def _reference(ref, ids, mask=None) -> np.ndarray:
    with torch.no_grad():
        out = ref(torch.from_numpy(ids), attention_mask=None if mask is None else torch.from_numpy(mask))
    return out.last_hidden_state.numpy()


def _ours(module, variables, ids, mask=None) -> np.ndarray:
    return np.asarray(
        jax.jit(module.apply)(
            variables, jnp.asarray(ids, jnp.int32), None if mask is None else jnp.asarray(mask, jnp.int32)
        )
    )


def _assert_same_variables(a, b):
    flat_a, flat_b = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert flat_a.keys() == flat_b.keys()
    for path in flat_a:
        np.testing.assert_array_equal(flat_a[path], flat_b[path], err_msg=str(path))


def test_relative_position_buckets_match_transformers():
    """Every distance up to 699 either way, for the tiny buckets and T5's (32, 128) among others."""
    bucket = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
    length = 700
    relative = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    for num_buckets, max_distance in [(8, 16), (32, 128), (32, 64), (16, 32), (64, 256)]:
        expected = bucket(relative, bidirectional=True, num_buckets=num_buckets, max_distance=max_distance)
        ours = relative_position_buckets(length, length, num_buckets, max_distance)
        np.testing.assert_array_equal(ours, expected.numpy(), err_msg=f'{num_buckets} buckets, {max_distance}')
    assert relative_position_buckets(3, 3, 8, 16).tolist() == [[0, 5, 6], [1, 0, 5], [2, 1, 0]]  # keys after: 4+


@pytest.mark.parametrize('name', list(CONFIGS))
def test_matches_transformers_single_and_sharded_folders(tmp_path, name):
    cfg = CONFIGS[name]
    ref = _torch_encoder(cfg, seed=0)
    ref.save_pretrained(tmp_path / 'single')
    module, variables = convert.load_diffusers(str(tmp_path / 'single'), 't5_encoder')
    assert module == T5Encoder(**cfg)
    ids, mask = _batch(cfg['vocab_size'], seed=1)
    err = rel_err(_ours(module, variables, ids, mask), _reference(ref, ids, mask))
    print(f'\n{name}: padded batch {err:.2e}')
    assert err <= TOL
    if name == 'relu':  # no mask: every position is attended
        assert rel_err(_ours(module, variables, ids), _reference(ref, ids)) <= TOL

    ref.save_pretrained(tmp_path / 'sharded', max_shard_size='20KB')
    index = json.loads((tmp_path / 'sharded' / 'model.safetensors.index.json').read_text())
    assert len(set(index['weight_map'].values())) > 1 and not (tmp_path / 'sharded' / 'model.safetensors').exists()
    sharded_module, sharded = convert.load_diffusers(str(tmp_path / 'sharded'), 't5_encoder')
    assert sharded_module == module
    _assert_same_variables(sharded, variables)


def test_conditional_generation_folder_reads_the_encoder_only(tmp_path):
    """A T5ForConditionalGeneration folder, sharded: decoder-only shards are never opened (here they are
    garbage); an older file's tied copy encoder.embed_tokens.weight stands in for shared.weight."""
    cfg = CONFIGS['gated_gelu']
    ref = _torch_encoder(cfg, seed=2, cls=transformers.T5ForConditionalGeneration)
    ref.save_pretrained(tmp_path, max_shard_size='20KB')
    index = json.loads((tmp_path / 'model.safetensors.index.json').read_text())['weight_map']
    encoder_shards = {shard for key, shard in index.items() if key.startswith(('shared.', 'encoder.'))}
    decoder_only = set(index.values()) - encoder_shards
    assert decoder_only
    for shard in decoder_only:
        (tmp_path / shard).write_bytes(b'not a safetensors file')
    module, variables = convert.load_diffusers(str(tmp_path), 't5_encoder')
    ids, mask = _batch(cfg['vocab_size'], seed=3)
    assert rel_err(_ours(module, variables, ids, mask), _reference(ref.get_encoder(), ids, mask)) <= TOL

    shard = index['shared.weight']
    state = load_file(tmp_path / shard)
    state['encoder.embed_tokens.weight'] = state.pop('shared.weight')
    save_file(state, tmp_path / shard, metadata={'format': 'pt'})
    index['encoder.embed_tokens.weight'] = index.pop('shared.weight')
    (tmp_path / 'model.safetensors.index.json').write_text(json.dumps({'metadata': {}, 'weight_map': index}))
    _, renamed = convert.load_diffusers(str(tmp_path), 't5_encoder')
    _assert_same_variables(renamed, variables)


def _random_variables(module, ids) -> dict:
    """Random variables in the module's shapes, drawn with numpy: norm scales near 1, the rest N(0, 0.2^2)."""
    shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), ids))
    rng = np.random.default_rng(4)
    return traverse_util.unflatten_dict(
        {
            path: (path[-1] == 'scale') + np.float32(0.2) * rng.standard_normal(x.shape, np.float32)
            for path, x in traverse_util.flatten_dict(shapes).items()
        }
    )


def test_flax_to_transformers_round_trip_scan_and_bfloat16(tmp_path):
    cfg = CONFIGS['gated_gelu']
    module = T5Encoder(**cfg)
    ids, mask = _batch(cfg['vocab_size'], seed=5)
    variables = _random_variables(module, jnp.asarray(ids, jnp.int32))
    convert.save_diffusers(module, variables, str(tmp_path / 'out'), 't5_encoder')
    config = json.loads((tmp_path / 'out' / 'config.json').read_text())
    assert config['model_type'] == 't5' and config['architectures'] == ['T5EncoderModel']
    assert 'encoder.embed_tokens.weight' not in load_file(tmp_path / 'out' / 'model.safetensors')

    ref, info = transformers.T5EncoderModel.from_pretrained(tmp_path / 'out', output_loading_info=True)
    assert not info['missing_keys'] and not info['unexpected_keys'] and not info['mismatched_keys'], info
    assert ref.encoder.embed_tokens.weight is ref.shared.weight
    ours = _ours(module, variables, ids, mask)
    assert rel_err(ours, _reference(ref.eval(), ids, mask)) <= TOL
    loaded, back = convert.load_diffusers(str(tmp_path / 'out'), 't5_encoder')
    assert loaded == module
    _assert_same_variables(back, variables)

    # scan_blocks (with remat) over the same folder: equal outputs, and it writes the same file
    scanned, scanned_vars = convert.load_diffusers(
        str(tmp_path / 'out'), 't5_encoder', scan_blocks=True, remat_policy='full'
    )
    assert 'block' in scanned_vars['params']['encoder'] and 'block_0' not in scanned_vars['params']['encoder']
    assert rel_err(_ours(scanned, scanned_vars, ids, mask), ours) <= 1e-6
    convert.save_diffusers(scanned, scanned_vars, str(tmp_path / 'scanned'), 't5_encoder')
    written, expected = (
        load_file(tmp_path / 'scanned' / 'model.safetensors'),
        load_file(tmp_path / 'out' / 'model.safetensors'),
    )
    assert written.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(written[key], expected[key], err_msg=key)

    # bfloat16 compute: float32 output, finite, as close to float32 as transformers' own bfloat16 model
    # (about 5% of the largest state on these random weights; the norms' mean square stays float32)
    half = _ours(module.clone(dtype=jnp.bfloat16), variables, ids, mask)
    assert half.dtype == np.float32 and np.isfinite(half).all()
    with torch.no_grad():
        torch_half = ref.to(torch.bfloat16)(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    torch_err = rel_err(torch_half.last_hidden_state.float().numpy(), ours)
    err = rel_err(half, ours)
    print(f'\nbfloat16 vs float32: ours {err:.2e}, transformers {torch_err:.2e}')
    assert err <= min(max(1.5 * torch_err, 2e-2), 0.1)


def test_t5_v1_1_xxl_parameter_count():
    """PixArt-α's text encoder: the Flax count equals transformers' unique (shared/embed_tokens tied) count."""
    cfg = dict(
        vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj='gated-gelu'
    )
    with torch.device('meta'):
        ref = transformers.T5EncoderModel(transformers.T5Config(**cfg))
    assert ref.encoder.embed_tokens.weight is ref.shared.weight
    torch_count = sum(p.numel() for p in {id(p): p for p in ref.parameters()}.values())
    module = convert.COMPONENTS['t5_encoder'].from_config(
        {'architectures': ['T5EncoderModel'], 'model_type': 't5', **cfg}
    )
    assert module == T5Encoder()  # the defaults are T5-v1.1-XXL's
    shapes = core.abstract_variables(module, convert.COMPONENTS['t5_encoder'])
    count = sum(x.size for x in jax.tree.leaves(shapes))
    assert count == torch_count == 4_762_310_656
    scanned = core.abstract_variables(module.clone(scan_blocks=True), convert.COMPONENTS['t5_encoder'])
    assert sum(x.size for x in jax.tree.leaves(scanned)) == count


def test_bad_folders_name_the_problem(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=r'config\.json not found: t5_encoder expects a transformers model '
        r'folder with config\.json and model\.safetensors',
    ):
        convert.load_diffusers(str(tmp_path), 't5_encoder')

    def folder(name, config, weights=b''):
        path = tmp_path / name
        path.mkdir()
        (path / 'config.json').write_text(json.dumps(config))
        if weights is not None:
            (path / 'model.safetensors').write_bytes(weights)
        return str(path)

    t5 = T5Encoder(**CONFIGS['relu']).hf_config()
    with pytest.raises(FileNotFoundError, match=r'no_weights/model\.safetensors not found'):
        convert.load_diffusers(folder('no_weights', t5, None), 't5_encoder')
    with pytest.raises(
        ValueError,
        match=r"config\.json is a CLIPTextModel, but component 't5_encoder' is a "
        r'T5EncoderModel or T5ForConditionalGeneration or T5Model',
    ):
        convert.load_diffusers(
            folder('clip', {'architectures': ['CLIPTextModel'], 'model_type': 'clip_text_model'}), 't5_encoder'
        )
    with pytest.raises(ValueError, match=r"model_type 'bert' is not a T5 config"):
        convert.load_diffusers(folder('bert', {'model_type': 'bert', 'hidden_size': 8}), 't5_encoder')
    with pytest.raises(
        ValueError,
        match=r"feed_forward_proj 'gated-silu' is not supported: valid are "
        r"\['gated-gelu', 'relu'\]",
    ):
        convert.load_diffusers(folder('silu', {**t5, 'feed_forward_proj': 'gated-silu'}), 't5_encoder')
    sharded = folder('sharded', t5, None)
    index = {
        'weight_map': {
            'shared.weight': 'model-00001-of-00002.safetensors',
            'encoder.final_layer_norm.weight': 'model-00002-of-00002.safetensors',
        }
    }
    (tmp_path / 'sharded' / 'model.safetensors.index.json').write_text(json.dumps(index))
    with pytest.raises(
        FileNotFoundError,
        match=r'names shards that are not in .*sharded: '
        r"\['model-00001-of-00002\.safetensors'",
    ):
        convert.load_diffusers(sharded, 't5_encoder')
    # a file short of the encoder's tensors names each missing key
    save_file({'shared.weight': np.zeros((50, 32), np.float32)}, os.path.join(sharded, 'model.safetensors'))
    with pytest.raises(
        ValueError,
        match=r't5_encoder weights do not match the module: missing \[.*'
        r"'encoder\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias",
    ):
        convert.load_diffusers(sharded, 't5_encoder')


# --- tokenizer ---------------------------------------------------------------------------------

TEXTS = [
    'a photo of the cat',
    'the   dog on a red mat',
    '',
    'Blue XYZ dogs!',
    'a red cat sitting on the mat of a blue dog on the mat',
]


@pytest.mark.parametrize('max_length', [120, 6])
def test_t5_tokenizer_matches_transformers(tmp_path, max_length):
    """A bare tokenizer.json folder, and the same saved by transformers (tokenizer_config.json names
    <pad>): both give T5TokenizerFast's ids and mask, pieces then </s> then <pad> = 0, truncation
    keeping the </s>."""
    tiny_t5_tokenizer_folder(tmp_path / 'bare')
    reference = transformers.T5TokenizerFast.from_pretrained(tmp_path / 'bare', extra_ids=0)
    expected = reference(TEXTS, padding='max_length', max_length=max_length, truncation=True)
    reference.save_pretrained(tmp_path / 'saved')
    assert json.loads((tmp_path / 'saved' / 'tokenizer_config.json').read_text())['pad_token'] == '<pad>'
    for folder in ('bare', 'saved'):
        tokenizer = create_tokenizer(str(tmp_path / folder), max_length)
        ours = tokenizer(TEXTS)
        assert ours['input_ids'].dtype == ours['attention_mask'].dtype == np.int32
        assert ours['input_ids'].shape == (len(TEXTS), max_length)
        np.testing.assert_array_equal(ours['input_ids'], np.array(expected['input_ids']), err_msg=folder)
        np.testing.assert_array_equal(ours['attention_mask'], np.array(expected['attention_mask']), err_msg=folder)
        assert tokenizer.pad_token_id == 0
        lengths = ours['attention_mask'].sum(1)
        assert (ours['input_ids'][np.arange(len(TEXTS)), lengths - 1] == 1).all()  # </s> last, truncated or not
        assert ours['input_ids'][2].tolist() == [1] + [0] * (max_length - 1)  # '' -> </s> then padding
    if max_length == 6:
        assert lengths.tolist() == [6, 6, 1, 6, 6]


def test_clip_tokenizer_folder_still_pads_with_its_own_token_and_spiece_hint(tmp_path):
    tiny_clip_tokenizer_folder(tmp_path / 'clip', '!')
    tokenizer = create_tokenizer(str(tmp_path / 'clip'), 8)
    reference = transformers.CLIPTokenizer.from_pretrained(tmp_path / 'clip')
    assert tokenizer.pad_token == '!' and tokenizer.pad_token_id == reference.convert_tokens_to_ids('!')
    np.testing.assert_array_equal(
        tokenizer(TEXTS)['input_ids'],
        reference(TEXTS, padding='max_length', max_length=8, truncation=True)['input_ids'],
    )
    (tmp_path / 'spm').mkdir()
    (tmp_path / 'spm' / 'spiece.model').write_bytes(b'')
    with pytest.raises(
        FileNotFoundError,
        match=r'tokenizer\.json not found .*holds only spiece\.model: write its '
        r'tokenizer\.json once with transformers',
    ):
        create_tokenizer(str(tmp_path / 'spm'), 120)
