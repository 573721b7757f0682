"""Parity of the Flax CLIP towers and tokenizer with transformers, and conversion both ways."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from conftest import tiny_clip_tokenizer_folder
from torch_reference import TOL, randomise, rel_err
from wurst_jax import convert
from wurst_jax.models.clip import CLIPTextModel, CLIPVisionModel
from wurst_jax.tokenizer import PaddedTokenizer

# eos_token_id 2 is the legacy rule (pool at argmax of the ids); any other id pools at its first
# occurrence, which the batches below make differ from the argmax (larger ids and EOS padding).
TEXT_CONFIGS = {
    'proj_quick_gelu_eos_id': dict(
        arch='CLIPTextModelWithProjection',
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=12,
        hidden_act='quick_gelu',
        projection_dim=16,
        eos_token_id=5,
    ),
    'noproj_gelu_legacy_eos': dict(
        arch='CLIPTextModel',
        vocab_size=50,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=3,
        max_position_embeddings=10,
        hidden_act='gelu',
        projection_dim=7,
        eos_token_id=2,
    ),
    'proj_gelu_one_layer': dict(
        arch='CLIPTextModelWithProjection',
        vocab_size=40,
        hidden_size=40,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=5,
        max_position_embeddings=9,
        hidden_act='gelu',
        projection_dim=24,
        eos_token_id=17,
        layer_norm_eps=1e-6,
    ),
}


def _text_batch(cfg: dict, length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of BOS, content, EOS, then padding: right-padded rows and one left-padded row."""
    rng = np.random.default_rng(seed)
    vocab, legacy = cfg['vocab_size'], cfg['eos_token_id'] == 2
    eos = vocab - 1 if legacy else cfg['eos_token_id']  # legacy files: EOS is the largest id
    pad = 0 if legacy else eos
    ids, mask = [], []
    for n, left in [(length - 2, False), (3, False), (0, False), (4, True)]:
        content = rng.integers(6, vocab - 1, n)  # ids above eos when eos is a real id
        row = np.concatenate([[1], content, [eos]])
        padding = np.full(length - len(row), pad)
        ids.append(np.concatenate([padding, row] if left else [row, padding]))
        valid = np.ones(len(row), np.int64)
        mask.append(np.concatenate([np.zeros_like(padding), valid] if left else [valid, np.zeros_like(padding)]))
    return np.array(ids, np.int64), np.array(mask, np.int64)


def _torch_text(cfg: dict):
    cfg = dict(cfg)
    cls = getattr(transformers, cfg.pop('arch'))
    return cls, transformers.CLIPTextConfig(bos_token_id=1, pad_token_id=0, **cfg)


def _check_text(module, variables, ref, ids, mask, errors=None):
    with torch.no_grad():
        expected = ref(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), output_hidden_states=True)
    ours = jax.jit(module.apply)(variables, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    assert len(ours['hidden_states']) == len(expected.hidden_states) == module.num_hidden_layers + 1
    pooled_ref = (
        expected.pooler_output
        if 'pooler_output' in expected
        else ref.text_model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).pooler_output
    )
    pairs = {
        'last_hidden_state': (ours['last_hidden_state'], expected.last_hidden_state),
        'hidden_states[-1]': (ours['hidden_states'][-1], expected.hidden_states[-1]),
        'hidden_states[0]': (ours['hidden_states'][0], expected.hidden_states[0]),
        'pooler_output': (ours['pooler_output'], pooled_ref),
    }
    if module.projection_dim is not None:
        pairs['text_embeds'] = (ours['text_embeds'], expected.text_embeds)
    else:
        assert 'text_embeds' not in ours
    for name, (a, b) in pairs.items():
        err = rel_err(a, b.detach().numpy())
        if errors is not None:
            errors[name] = max(errors.get(name, 0.0), err)
        assert err <= TOL, (name, err)


@pytest.mark.parametrize('name', list(TEXT_CONFIGS))
def test_text_matches_transformers(tmp_path, name):
    cfg = TEXT_CONFIGS[name]
    cls, config = _torch_text(cfg)
    ref = randomise(cls(config), seed=0)
    ref.save_pretrained(tmp_path)
    module, variables = convert.load_diffusers(str(tmp_path), 'clip_text')
    assert module.projection_dim == (None if cfg['arch'] == 'CLIPTextModel' else cfg['projection_dim'])
    length = cfg['max_position_embeddings'] - 1  # shorter than the position table
    ids, mask = _text_batch(cfg, length, seed=1)
    errors = {}
    _check_text(module, variables, ref, ids, mask, errors)
    print(f'\n{name}: ' + ', '.join(f'{k} {v:.2e}' for k, v in errors.items()))
    if name == 'proj_gelu_one_layer':  # the same batch without an attention mask: causal only
        with torch.no_grad():
            expected = ref(torch.from_numpy(ids)).last_hidden_state.numpy()
        ours = jax.jit(module.apply)(variables, jnp.asarray(ids, jnp.int32))['last_hidden_state']
        assert rel_err(ours, expected) <= TOL


def test_text_pools_first_eos_not_argmax(tmp_path):
    """With a real eos_token_id the pooled state is at the first EOS, not at the largest id."""
    module = CLIPTextModel(
        vocab_size=20,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=8,
        projection_dim=None,
        eos_token_id=4,
    )
    ids = jnp.array([[1, 9, 4, 4, 4, 4], [1, 19, 7, 4, 18, 4]], jnp.int32)
    variables = _random_variables(module, ids)
    out = jax.jit(module.apply)(variables, ids)
    np.testing.assert_array_equal(out['pooler_output'], out['last_hidden_state'][jnp.arange(2), jnp.array([2, 3])])
    out = jax.jit(module.clone(eos_token_id=2).apply)(variables, ids)
    np.testing.assert_array_equal(out['pooler_output'], out['last_hidden_state'][jnp.arange(2), jnp.array([1, 1])])


VISION_CONFIGS = {
    'image30_patch6_quick_gelu': dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=30,
        patch_size=6,
        hidden_act='quick_gelu',
        projection_dim=16,
    ),
    'image32_patch6_gelu': dict(
        hidden_size=48,
        intermediate_size=40,
        num_hidden_layers=3,
        num_attention_heads=6,
        image_size=32,
        patch_size=6,
        hidden_act='gelu',
        projection_dim=20,
        layer_norm_eps=1e-6,
    ),  # 32 = 5 * 6 + 2: the conv drops the last 2 pixels
}


@pytest.mark.parametrize('name', list(VISION_CONFIGS))
def test_vision_matches_transformers(tmp_path, name):
    cfg = VISION_CONFIGS[name]
    ref = randomise(transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**cfg)), seed=2)
    ref.save_pretrained(tmp_path)
    # an old file that still holds the position_ids buffer
    state = load_file(tmp_path / 'model.safetensors')
    state['vision_model.embeddings.position_ids'] = np.arange((cfg['image_size'] // cfg['patch_size']) ** 2 + 1)[None]
    save_file(state, tmp_path / 'model.safetensors', metadata={'format': 'pt'})
    module, variables = convert.load_diffusers(str(tmp_path), 'clip_vision')
    size = cfg['image_size']
    images = np.random.default_rng(3).standard_normal((2, size, size, 3)).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), output_hidden_states=True)
        pooled_ref = ref.vision_model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).pooler_output
    ours = jax.jit(module.apply)(variables, images)
    assert len(ours['hidden_states']) == len(expected.hidden_states)
    errors = {
        'last_hidden_state': rel_err(ours['last_hidden_state'], expected.last_hidden_state.numpy()),
        'hidden_states[-1]': rel_err(ours['hidden_states'][-1], expected.hidden_states[-1].numpy()),
        'pooler_output': rel_err(ours['pooler_output'], pooled_ref.numpy()),
        'image_embeds': rel_err(ours['image_embeds'], expected.image_embeds.numpy()),
    }
    print(f'\n{name}: ' + ', '.join(f'{k} {v:.2e}' for k, v in errors.items()))
    assert max(errors.values()) <= TOL, errors


def _random_variables(module, *inputs) -> dict:
    """Random variables in the module's shapes, drawn with numpy (no init to compile); LayerNorm
    scales near 1, everything else (biases included) N(0, 0.2^2)."""
    shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), *inputs))
    rng = np.random.default_rng(1)
    flat = traverse_util.flatten_dict(shapes)
    return traverse_util.unflatten_dict(
        {
            path: (path[-1] == 'scale') + np.float32(0.2) * rng.standard_normal(x.shape, np.float32)
            for path, x in flat.items()
        }
    )


@pytest.mark.parametrize('projection_dim', [12, None], ids=['with_projection', 'no_projection'])
def test_text_flax_to_transformers_round_trip(tmp_path, projection_dim):
    module = CLIPTextModel(
        vocab_size=30,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=3,
        max_position_embeddings=8,
        hidden_act='gelu',
        projection_dim=projection_dim,
        eos_token_id=3,
    )
    ids = jnp.zeros((1, 8), jnp.int32)
    variables = _random_variables(module, ids)
    convert.save_diffusers(module, variables, str(tmp_path), 'clip_text')
    with open(tmp_path / 'config.json') as f:
        assert json.load(f)['model_type'] == 'clip_text_model'

    cls = transformers.CLIPTextModel if projection_dim is None else transformers.CLIPTextModelWithProjection
    ref, info = cls.from_pretrained(tmp_path, output_loading_info=True)
    assert not info['missing_keys'] and not info['unexpected_keys'] and not info['mismatched_keys'], info
    cfg = dict(vocab_size=30, eos_token_id=3)
    batch_ids, mask = _text_batch(cfg, 8, seed=4)
    _check_text(module, variables, ref.eval(), batch_ids, mask)

    loaded, back = convert.load_diffusers(str(tmp_path), 'clip_text')
    assert loaded == module
    jax.tree.map(np.testing.assert_array_equal, back, variables)


def test_vision_flax_to_transformers_round_trip(tmp_path):
    module = CLIPVisionModel(
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=20,
        patch_size=5,
        hidden_act='gelu',
        projection_dim=8,
    )
    images = np.random.default_rng(5).standard_normal((2, 20, 20, 3)).astype(np.float32)
    variables = _random_variables(module, images)
    convert.save_diffusers(module, variables, str(tmp_path), 'clip_vision')

    ref, info = transformers.CLIPVisionModelWithProjection.from_pretrained(tmp_path, output_loading_info=True)
    assert not info['missing_keys'] and not info['unexpected_keys'] and not info['mismatched_keys'], info
    with torch.no_grad():
        expected = ref.eval()(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
    ours = jax.jit(module.apply)(variables, images)
    assert rel_err(ours['last_hidden_state'], expected.last_hidden_state.numpy()) <= TOL
    assert rel_err(ours['image_embeds'], expected.image_embeds.numpy()) <= TOL

    loaded, back = convert.load_diffusers(str(tmp_path), 'clip_vision')
    assert loaded == module
    jax.tree.map(np.testing.assert_array_equal, back, variables)


def test_text_rejects_other_folders(tmp_path):
    config = transformers.CLIPVisionConfig(
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=4,
        patch_size=2,
        projection_dim=4,
    )
    randomise(transformers.CLIPVisionModelWithProjection(config), seed=3).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match='is a CLIPVisionModelWithProjection'):
        convert.load_diffusers(str(tmp_path), 'clip_text')


# ViT-H text (Würstchen), bigG text (Stable Cascade) and ViT-L/14 vision.
FULL_SIZE = {
    'vit_h_text': (
        'CLIPTextModel',
        dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            vocab_size=49408,
            max_position_embeddings=77,
            hidden_act='gelu',
        ),
    ),
    'bigg_text': (
        'CLIPTextModelWithProjection',
        dict(
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=20,
            vocab_size=49408,
            max_position_embeddings=77,
            hidden_act='gelu',
            projection_dim=1280,
        ),
    ),
    'vit_l14_vision': (
        'CLIPVisionModelWithProjection',
        dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=224,
            patch_size=14,
            projection_dim=768,
        ),
    ),
}


@pytest.mark.parametrize('name', list(FULL_SIZE))
def test_full_size_parameter_counts(name):
    arch, cfg = FULL_SIZE[name]
    is_vision = 'Vision' in arch
    config_cls = transformers.CLIPVisionConfig if is_vision else transformers.CLIPTextConfig
    with torch.device('meta'):
        torch_count = sum(p.numel() for p in getattr(transformers, arch)(config_cls(**cfg)).parameters())
    name = 'clip_vision' if is_vision else 'clip_text'
    module = convert.COMPONENTS[name].from_config({'architectures': [arch], **cfg})
    shapes = convert.core.abstract_variables(module, convert.COMPONENTS[name])
    assert sum(x.size for x in jax.tree.leaves(shapes)) == torch_count


# --- tokenizer ---------------------------------------------------------------------------------

TEXTS = [
    'the cat',
    'A photo of THE   dog!!',
    'a photo of a cat, a dog, the cat. xyz the dog of a cat',
    '',
    'zebra 42 ok',
]


@pytest.mark.parametrize('pad_token', ['!', '<|endoftext|>'], ids=['pad_bang', 'pad_eos'])
@pytest.mark.parametrize('max_length', [8, 77])
def test_tokenizer_matches_transformers(tmp_path, pad_token, max_length):
    tiny_clip_tokenizer_folder(tmp_path, pad_token)
    reference = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    expected = reference(TEXTS, padding='max_length', max_length=max_length, truncation=True)
    tokenizer = PaddedTokenizer.from_folder(str(tmp_path), max_length=max_length)
    ours = tokenizer(TEXTS)
    assert ours['input_ids'].dtype == ours['attention_mask'].dtype == np.int32
    assert ours['input_ids'].shape == (len(TEXTS), max_length)
    np.testing.assert_array_equal(ours['input_ids'], np.array(expected['input_ids']))
    np.testing.assert_array_equal(ours['attention_mask'], np.array(expected['attention_mask']))
    assert tokenizer.pad_token_id == reference.convert_tokens_to_ids(pad_token)
    assert ours['input_ids'][0, -1] == tokenizer.pad_token_id  # 'the cat' is padded


def test_tokenizer_missing_file_names_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=f'tokenizer.json not found in tokenizer folder {tmp_path}'):
        PaddedTokenizer.from_folder(str(tmp_path))


def test_word_tokenizer_and_byte_tokenizer():
    from wurst_jax.data import shapes
    from wurst_jax.tokenizer import ByteTokenizer, create_tokenizer

    words = create_tokenizer('words', 8, shapes.caption_vocabulary())
    out = words(['a red circle on the left', 'A RED zebra', 'a red circle on the left and a blue square'])
    vocab = words.tokenizer.get_vocab()
    red, left, unk = vocab['red'], vocab['left'], vocab['<unk>']
    np.testing.assert_array_equal(
        out['input_ids'][0], [1, vocab['a'], red, vocab['circle'], vocab['on'], vocab['the'], left, 2]
    )
    np.testing.assert_array_equal(out['input_ids'][1], [1, vocab['a'], red, unk, 2, 0, 0, 0])  # case-folded
    np.testing.assert_array_equal(out['attention_mask'][1], [1, 1, 1, 1, 1, 0, 0, 0])
    assert out['input_ids'][2, -1] == words.eos_token_id == 2  # truncation keeps the EOS
    assert words.vocab_size == len(shapes.caption_vocabulary()) + 4
    every_caption = {w for i in range(200) for w in shapes.make_example(0, i, 16)[1].split()}
    assert every_caption <= set(vocab)  # the grammar never produces <unk>

    data = ByteTokenizer(6)(['hé', 'abcdefgh'])
    np.testing.assert_array_equal(data['input_ids'], [[256, 104, 195, 169, 257, 258], [256, 97, 98, 99, 100, 257]])
    np.testing.assert_array_equal(data['attention_mask'], [[1, 1, 1, 1, 1, 0], [1] * 6])
