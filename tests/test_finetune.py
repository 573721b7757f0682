"""configs/wuerstchen_v2_prior_finetune.py end to end on tiny random checkpoints made here (a
diffusers prior, a transformers CLIP text encoder with its tokenizer, an effnet folder, and a
folder of captioned images), and `wurst_jax.precompute` of its frozen encoders."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, small_prior_run_config
from wurst_jax import checkpoint, config_lib, convert, tasks, train
from wurst_jax.data import input_pipeline


def test_prior_finetune_from_diffusers_folders(finetune_arg, tmp_path):
    prior_dir = finetune_arg.split(',')[0].removeprefix('prior=')
    config = small_prior_run_config('wuerstchen_v2_prior_finetune', finetune_arg, tmp_path / 'data')
    tasks.validate(config)
    train.train_and_evaluate(config, str(tmp_path / 'run'))

    _, state = checkpoint.load_trained(str(tmp_path / 'run'))
    assert int(state['step']) == 2
    _, pretrained = convert.load_diffusers(str(prior_dir), 'prior', scan_blocks=True)
    deltas = jax.tree.map(
        lambda a, b: float(np.abs(np.asarray(a) - b).max()), state['params']['prior'], pretrained['params']
    )
    # Two AdamW steps at lr 1e-5 from the released weights: every tensor within ~2e-5 of it, some moved.
    assert max(jax.tree.leaves(deltas)) < 1e-4 and max(jax.tree.leaves(deltas)) > 0


def test_precompute_equals_the_encoders_and_trains(finetune_arg, tmp_path):
    """The CLI's records hold what the frozen encoders give on the fly, a step on them has the same
    gradients as a step on the images, training reads them, and a config they were not made with is refused."""
    out = tmp_path / 'pre'
    result = subprocess.run(
        [
            sys.executable,
            '-m',
            'wurst_jax.precompute',
            f'--config=configs/wuerstchen_v2_prior_finetune.py:{finetune_arg}',
            f'--config.input.data_dir={tmp_path / "data"}',
            '--config.optimizer.warmup_steps=0',
            f'--out={out}',
            '--splits=train',
            '--batch_size=3',
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    names = ['empty_caption.msgpack', 'metadata.json', 'train-00000-of-00001.array_record']
    assert sorted(p.name for p in out.iterdir()) == names

    config = small_prior_run_config('wuerstchen_v2_prior_finetune', finetune_arg, tmp_path / 'data')
    task = tasks.create(config)
    frozen = task.frozen_params()
    images = next(
        input_pipeline.create_eval_iterator(config.input, split='train', batch_size=8, tokenizer=task.tokenizer)
    )
    pre_config = small_prior_run_config('wuerstchen_v2_prior_finetune', finetune_arg, tmp_path / 'data')
    pre_config.input.precomputed = str(out)
    tasks.validate(pre_config)
    pre_task = tasks.create(pre_config)
    records = next(input_pipeline.create_eval_iterator(pre_config.input, split='train', batch_size=8))
    assert set(pre_task.batch_spec()) == {'latents', 'text_states'}
    np.testing.assert_array_equal(records['id'], images['id'])
    as_jnp = lambda b, keys: {k: jnp.asarray(b[k]) for k in keys}
    latents = task.latents(frozen, jnp.asarray(images['image']))
    states = task.text.encode(frozen['text'], jnp.asarray(images['tokens']), jnp.asarray(images['token_mask']))
    np.testing.assert_allclose(records['latents'], latents, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(records['text_states'], states, rtol=1e-5, atol=1e-6)

    params, model_state = pre_task.init(jax.random.key(0), None)
    rng = jax.random.key(1)
    grads, _, metrics = task.grads(
        params, model_state, frozen, as_jnp(images, ('image', 'tokens', 'token_mask')), rng, 0
    )
    # The run on records never reads the CLIP weights: dropped captions take the stored empty caption's states.
    pre_frozen = pre_task.frozen_params()
    assert 'text' not in pre_frozen
    empty = task.text.empty_states(frozen['text'])
    np.testing.assert_allclose(pre_frozen['text_empty'], empty, rtol=1e-5, atol=1e-6)
    pre_grads, _, pre_metrics = pre_task.grads(
        params, model_state, pre_frozen, as_jnp(records, ('latents', 'text_states')), rng, 0
    )
    np.testing.assert_allclose(pre_metrics['loss'], metrics['loss'], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), pre_grads, grads)

    train.train_and_evaluate(pre_config, str(tmp_path / 'run'))
    assert int(checkpoint.load_trained(str(tmp_path / 'run'))[1]['step']) == 2

    pre_config.latent_scaling = 'none'
    with pytest.raises(config_lib.ConfigError, match='latent_scaling'):
        tasks.validate(pre_config)
    pre_config.input.precomputed = str(tmp_path / 'nowhere')
    with pytest.raises(config_lib.ConfigError, match='input.precomputed'):
        tasks.validate(pre_config)
    result = subprocess.run(
        [sys.executable, '-m', 'wurst_jax.precompute', '--config=configs/shapes.py:runlocal'],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0 and "Invalid config: config.model_family='stage_a'" in result.stderr
