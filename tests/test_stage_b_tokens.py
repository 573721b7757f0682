"""Würstchen v1's token Stage B: its noising, loss and sampler, training on Stage A's codes, and the
v1 chain (Stage C -> token Stage B -> Stage A) through the demo, sampling CLI and evaluation job."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import load_config, run_module
from wurst_jax import tasks
from wurst_jax.config_lib import ConfigError
from wurst_jax.tasks.stage_b_tokens import add_token_noise, sample_tokens, token_loss, token_loss_weight


@pytest.mark.parametrize('t', [0.0, 0.1, 0.5, 0.9, 1.0])
def test_the_noised_fraction_is_t(t):
    tokens = jnp.zeros((4, 64, 64), jnp.int32) + 7
    noised, mask = add_token_noise(jax.random.key(0), tokens, jnp.full((4,), t), 8192)
    assert abs(float(mask.mean()) - t) < 4 * np.sqrt(t * (1 - t) / mask.size) + 1e-6
    assert bool(jnp.all(jnp.where(mask == 0, noised == tokens, True)))  # kept tokens are untouched
    assert int(noised.min()) >= 0 and int(noised.max()) < 8192
    if t == 1.0:  # replacements are uniform over the codebook
        assert abs(float(noised.mean()) - 8191 / 2) < 40


def test_the_noise_uses_given_replacements():
    tokens, random = jnp.zeros((1, 8, 8), jnp.int32), jnp.full((1, 8, 8), 5, jnp.int32)
    noised, mask = add_token_noise(jax.random.key(1), tokens, jnp.array([0.5]), 16, random)
    np.testing.assert_array_equal(noised, 5 * mask)


def test_loss_weight_and_its_normalisation_by_hand():
    t = jnp.array([0.5, 1.0])
    mask = jnp.array([[[1, 0], [0, 0]], [[0, 0], [0, 1]]])
    weight = token_loss_weight(t, mask)
    # Kept tokens: 1 - (1 - t)(1 - 0.3), i.e. 0.65 at t = 0.5 and 1 at t = 1; re-noised ones 1.
    np.testing.assert_allclose(weight, [[[1, 0.65], [0.65, 0.65]], [[1, 1], [1, 1]]], rtol=1e-6)
    logits = jax.random.normal(jax.random.key(2), (2, 2, 2, 3))
    targets = jnp.array([[[0, 1], [2, 0]], [[1, 1], [2, 2]]])
    smoothed = 0.9 * np.eye(3)[np.asarray(targets)] + 0.1 / 3
    ce = -(smoothed * np.asarray(jax.nn.log_softmax(logits))).sum(-1)
    w = np.asarray(weight)
    expected = np.mean((ce * w).sum((1, 2)) / w.sum((1, 2)))
    assert float(token_loss(logits, targets, weight, 0.1)) == pytest.approx(expected, rel=1e-6)


def _one_hot_model(target):
    """logits_fn whose logits are one-hot on `target` whatever it is given (both guidance halves)."""

    def logits_fn(tokens, t, conditional):
        del t, conditional
        return 20.0 * jax.nn.one_hot(jnp.broadcast_to(target, tokens.shape), 16)

    return logits_fn


@pytest.mark.parametrize('guidance', [1.0, 4.0])
def test_argmax_sampling_returns_the_map_the_logits_point_at(guidance):
    target = jax.random.randint(jax.random.key(3), (1, 6, 6), 0, 16)
    out = sample_tokens(
        _one_hot_model(target),
        jax.random.key(4),
        (1, 6, 6),
        16,
        steps=5,
        guidance=guidance,
        temperature=(0.7, 0.3),
        mode='argmax',
    )
    np.testing.assert_array_equal(out, target)
    out = sample_tokens(
        _one_hot_model(target),
        jax.random.key(4),
        (1, 6, 6),
        16,
        steps=5,
        guidance=guidance,
        temperature=(0.7, 0.3),
        mode='multinomial',
    )
    np.testing.assert_array_equal(out, target)  # 20 / 0.3 apart: the draw cannot miss


def test_sampler_is_deterministic_per_seed():
    def uniform(tokens, t, conditional):
        del t, conditional
        return jnp.zeros((*tokens.shape, 16))

    a = sample_tokens(uniform, jax.random.key(5), (2, 8, 8), 16, 4, 2.0, (1.0, 0.5))
    np.testing.assert_array_equal(a, sample_tokens(uniform, jax.random.key(5), (2, 8, 8), 16, 4, 2.0, (1.0, 0.5)))
    assert not np.array_equal(a, sample_tokens(uniform, jax.random.key(6), (2, 8, 8), 16, 4, 2.0, (1.0, 0.5)))
    # The last step's draw is returned as it is, not re-noised.
    out = sample_tokens(_one_hot_model(jnp.full((1, 8, 8), 3)), jax.random.key(7), (1, 8, 8), 16, 1, 1.0, (1.0, 1.0))
    np.testing.assert_array_equal(out, 3)


def _tiny_task(tiny_stage_folders, **model):
    config = load_config('shapes', 'stage=b,tokens,runlocal')
    config.stage_a.source = str(tiny_stage_folders['vqgan'])
    config.model.update(num_labels=16, **model)
    return config


def test_num_labels_must_be_stage_as_codebook_size(tiny_stage_folders):
    config = _tiny_task(tiny_stage_folders)
    config.model.num_labels = 32
    with pytest.raises(ConfigError, match=r'model\.num_labels=32 .*codebook size of Stage A .*: 16'):
        tasks.create(config)


def test_a_tiny_overfit_drives_the_cross_entropy_down(tiny_stage_folders):
    config = _tiny_task(tiny_stage_folders)
    config.effnet.update(noise=0.0, dropout=0.0)
    config.text.dropout = 0.0
    tasks.validate(config)
    task = tasks.create(config)
    rng = np.random.default_rng(0)
    batch = {
        'image': jnp.asarray(rng.uniform(-1, 1, (4, 32, 32, 3)), jnp.float32),
        'tokens': jnp.asarray(task.tokenizer(['a red circle'] * 4)['input_ids']),
        'token_mask': jnp.asarray(task.tokenizer(['a red circle'] * 4)['attention_mask']),
    }
    params, state = task.init(jax.random.key(0), batch)
    params = jax.tree.map(lambda x: getattr(x, 'value', x), params, is_leaf=lambda x: hasattr(x, 'value'))
    frozen = task.frozen_params()
    held_out = [jax.tree.map(np.asarray, batch)]
    before = task.evaluate(params, state, frozen, held_out)
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, state, frozen, key):
        grads, state, metrics = task.grads(params, state, frozen, batch, key, jnp.int32(0))
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, state, metrics

    losses = []
    for i in range(60):
        params, opt, state, metrics = step(params, opt, state, frozen, jax.random.key(i % 4))
        losses.append(float(metrics['loss']))
    assert np.isfinite(losses).all() and np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4])
    after = task.evaluate(params, state, frozen, held_out)
    assert after['loss'] < 0.5 * before['loss'] and after['accuracy_t0.1'] > 0.9 > before['accuracy_t0.1']
    assert set(after) == {
        f'{m}{t}' for m in ('loss', 'accuracy') for t in ('', '_t0.1', '_t0.25', '_t0.5', '_t0.75', '_t0.9')
    }


# -- The v1 chain end to end -------------------------------------------------------------------


@pytest.fixture(scope='module')
def v1_root(tmp_path_factory):
    """All three stages trained by `wurst_jax.demo --runlocal --stage_b=tokens`."""
    root = tmp_path_factory.mktemp('v1')
    result = run_module(
        'wurst_jax.demo',
        f'--workdir={root}',
        f'--data_dir={root / "data"}',
        '--runlocal',
        '--stage_b=tokens',
        '--num_eval_prompts=8',
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return root


@pytest.mark.slow
def test_the_v1_demo_trains_a_token_stage_b_and_samples_the_chain(v1_root, tmp_path):
    from wurst_jax import checkpoint
    from wurst_jax.pipeline import Pipeline

    assert checkpoint.saved_config(str(v1_root / 'stage_b')).model_family == 'stage_b_tokens'
    alignment = json.loads((v1_root / 'alignment.json').read_text())
    assert alignment['num_images'] == 8 and {'stage_b_s', 'sampling_s'} <= alignment.keys()

    pipeline = Pipeline.from_root(str(v1_root))
    prompts = ['a red circle on the left', 'a blue square at the top and a green triangle on the right', 'x']
    first = pipeline(prompts, seed=3, batch_size=8)
    assert first.shape == (3, 32, 32, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(pipeline(prompts, seed=3, batch_size=1), first)  # per-prompt keys
    one_device = Pipeline.from_root(str(v1_root), devices=jax.devices()[:1])
    np.testing.assert_array_equal(one_device(prompts, seed=3, batch_size=2), first)
    assert not np.array_equal(pipeline(prompts, seed=4), first)
    hotter = pipeline(prompts, seed=3, decoder_temperature=(3.0, 2.0))
    assert hotter.shape == first.shape and not np.array_equal(hotter, first)

    prompt_file = tmp_path / 'prompts.txt'
    prompt_file.write_text('a red circle on the left\na white square in the center\n')
    out = tmp_path / 'out'
    result = run_module(
        'wurst_jax.sample',
        f'--workdir={v1_root}',
        f'--prompts={prompt_file}',
        f'--out={out}',
        '--decoder_steps=3',
        '--decoder_guidance=1.5',
        '--decoder_temperature=1.0,0.5',
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ['00000.png', '00001.png', 'grid.png', 'prompts.json']
    result = run_module(
        'wurst_jax.sample',
        f'--workdir={v1_root}',
        f'--prompts={prompt_file}',
        f'--out={out}',
        '--decoder_temperature=hot',
    )
    assert result.returncode != 0 and '--decoder_temperature=hot: give two numbers' in result.stderr

    from wurst_jax.evaluate import job

    config = load_config('eval')
    config.update(
        workdir=str(v1_root),
        prompts=str(prompt_file),
        out_dir=str(tmp_path / 'eval'),
        prior_steps=2,
        decoder_steps=2,
        batch_size=4,
        decoder_temperature='1.0,0.5',
    )
    results = job.run(config)
    assert [r['step'] for r in results] == checkpoint.all_steps(v1_root / 'stage_c')
    assert all(r['num_images'] == 2 for r in results)
