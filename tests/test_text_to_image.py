"""Text to image end to end at toy size: the demo trains all three stages, sampling is
deterministic, takes other sizes, negative prompts and LoRA files, the CLI checks its inputs, and the
Stage B / C steps run sharded on 8 devices."""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from conftest import load_config, run_module
from wurst_jax import lora, lowering, sharding, tasks, train_state
from wurst_jax.convert import lora as lora_format
from wurst_jax.data import input_pipeline
from wurst_jax.tasks import formats


def test_demo_writes_stages_grid_and_alignment(demo_root):
    for stage in 'abc':
        assert any((demo_root / f'stage_{stage}' / 'checkpoints').iterdir())
    grid = np.asarray(Image.open(demo_root / 'samples' / 'grid.png'))
    assert grid.ndim == 3 and grid.shape[2] == 3
    alignment = json.loads((demo_root / 'alignment.json').read_text())
    assert alignment['num_images'] == 8 and 0 <= alignment['colour_accuracy'] <= 1
    assert {'stage_a_s', 'stage_b_s', 'stage_c_s', 'sampling_s'} <= alignment.keys()


def test_sampling_is_deterministic_and_independent_of_batching(demo_root):
    from wurst_jax.pipeline import Pipeline

    pipeline = Pipeline.from_root(str(demo_root))
    prompts = ['a red circle on the left', 'a blue square at the top and a green triangle on the right', 'x']
    first = pipeline(prompts, seed=3, batch_size=8)
    assert first.shape == (3, 32, 32, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(pipeline(prompts, seed=3, batch_size=16), first)
    assert not np.array_equal(pipeline(prompts, seed=4, batch_size=8), first)
    with pytest.raises(ValueError, match='only a token Stage B'):  # a diffusion Stage B has no temperature
        pipeline(prompts, decoder_temperature=(1.0, 0.5))


def test_sampling_at_other_sizes_and_with_a_negative_prompt(demo_root):
    from wurst_jax.pipeline import Pipeline

    pipeline = Pipeline.from_root(str(demo_root))
    size, prompts = pipeline.image_size, ['a red circle on the left', 'a blue square at the top']
    wide = pipeline(prompts, seed=3, height=size, width=2 * size)
    assert wide.shape == (2, size, 2 * size, 3)
    with pytest.raises(ValueError, match=f'{size + 1}x{size}: .* the nearest size they make is {size}x{size}'):
        pipeline(prompts, height=size + 1, width=size)
    guided = dict(seed=3, decoder_guidance=2.0)  # the tiny demo's decoder samples unguided by default
    first = pipeline(prompts, **guided)
    np.testing.assert_array_equal(pipeline(prompts, negative_prompt='', **guided), first)  # the default
    assert not np.array_equal(pipeline(prompts, negative_prompt='a white square in the center', **guided), first)


def _random_lora_file(pipeline, path, seed):
    """Random rank-2 attention adapters for the pipeline's prior, written as wurst_jax.export writes them."""
    params = jax.device_get(pipeline.prior_params)
    adapters = lora.init_adapters(
        jax.random.key(seed), params, ml_collections.ConfigDict(dict(lora=dict(rank=2, targets='attention')))
    )
    noise = jax.random.key(seed + 1)
    adapters = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(noise, x.shape), adapters)  # lora_b non-zero
    name, module, component, prefix = formats.diffusers_network(pipeline.prior_task)
    save_file(lora_format.to_diffusers(module, component, params[name], adapters[name], 1.0, prefix), str(path))
    return params, adapters


def test_sampling_merges_lora_files_at_their_scales(demo_root, tmp_path):
    from wurst_jax.pipeline import Pipeline, parse_lora

    assert parse_lora(f'{tmp_path}/a.safetensors:0.5') == (f'{tmp_path}/a.safetensors', 0.5)
    assert parse_lora(str(tmp_path)) == (str(tmp_path), 1.0)
    base = Pipeline.from_root(str(demo_root))
    prompts = ['a red circle on the left', 'a blue square at the top']
    params, first = _random_lora_file(base, tmp_path / 'first.safetensors', seed=1)
    (tmp_path / 'second').mkdir()
    _, second = _random_lora_file(base, tmp_path / 'second' / lora_format.LORA_WEIGHTS, seed=2)
    images = base(prompts, seed=1)

    at_zero = Pipeline.from_root(str(demo_root), loras=[(str(tmp_path / 'first.safetensors'), 0.0)])
    np.testing.assert_array_equal(at_zero(prompts, seed=1), images)
    both = Pipeline.from_root(
        str(demo_root), loras=[(str(tmp_path / 'first.safetensors'), 0.5), (str(tmp_path / 'second'), 2.0)]
    )
    expected = lora.merge(lora.merge(params['prior'], first['prior'], 0.5), second['prior'], 2.0)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), both.prior_params['prior'], expected
    )
    assert not np.array_equal(both(prompts, seed=1), images)

    (tmp_path / 'bad.safetensors').write_bytes(b'not a safetensors file')
    with pytest.raises(ValueError, match='bad.safetensors is not a readable safetensors file'):
        Pipeline.from_root(str(demo_root), loras=[(str(tmp_path / 'bad.safetensors'), 1.0)])
    save_file({'transformer.blocks.lora_A.weight': np.zeros((2, 4), np.float32)}, str(tmp_path / 'other.safetensors'))
    with pytest.raises(ValueError, match='other.safetensors: its keys name no stage of this run'):
        Pipeline.from_root(str(demo_root), loras=[(str(tmp_path / 'other.safetensors'), 1.0)])
    with pytest.raises(FileNotFoundError, match='missing: no LoRA file'):
        Pipeline.from_root(str(demo_root), loras=[(str(tmp_path / 'missing'), 1.0)])


def test_sample_cli(demo_root, tmp_path):
    prompts = tmp_path / 'prompts.txt'
    prompts.write_text('a red circle on the left\n\na white square in the center\n')
    out = tmp_path / 'out'
    result = run_module(
        'wurst_jax.sample',
        f'--workdir={demo_root}',
        f'--prompts={prompts}',
        f'--out={out}',
        '--prior_steps=2',
        '--decoder_steps=2',
        '--negative_prompt=a blue triangle',
        '--height=32',
        '--width=64',
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ['00000.png', '00001.png', 'grid.png', 'prompts.json']
    assert Image.open(out / '00000.png').size == (64, 32)
    prompts = json.loads((out / 'prompts.json').read_text())
    assert prompts == ['a red circle on the left', 'a white square in the center']
    result = run_module(
        'wurst_jax.sample', f'--workdir={demo_root}', f'--prompts={tmp_path}/prompts.txt', f'--out={out}', '--width=30'
    )
    assert result.returncode != 0 and 'the nearest size they make is 32x32' in result.stderr


def test_sample_cli_bad_inputs(tmp_path):
    empty = tmp_path / 'empty.txt'
    empty.write_text('\n  \n')
    result = run_module('wurst_jax.sample', f'--workdir={tmp_path}', f'--prompts={empty}', f'--out={tmp_path}/o')
    assert result.returncode != 0 and 'has no prompts' in result.stderr
    result = run_module(
        'wurst_jax.sample', f'--workdir={tmp_path}', f'--prompts={tmp_path}/missing.txt', f'--out={tmp_path}/o'
    )
    assert result.returncode != 0 and 'cannot read prompts file' in result.stderr
    empty.write_text('a red circle on the left\n')
    result = run_module('wurst_jax.sample', f'--workdir={tmp_path}', f'--prompts={empty}', f'--out={tmp_path}/o')
    assert result.returncode != 0 and 'stage_c/checkpoints has no checkpoint' in result.stderr


def _sharded_step(config):
    """(task, compiled step, state, batch iterator, state shardings) on a data=4 x fsdp=2 mesh."""
    config.mesh.data, config.mesh.fsdp = 4, 2
    mesh = sharding.create_mesh(config.mesh)
    rules = tuple(tuple(r) for r in config.sharding_rules)
    task = tasks.create(config)
    tx = task.optimizer()
    init_fn, _, state_sharding = lowering.abstract_train_state(config, task, tx, mesh, rules)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    frozen = jax.device_put(task.frozen_params(), sharding.replicated(mesh))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = jax.jit(lambda r, x: nn.meta.unbox(init_fn(r, x)), out_shardings=state_sharding)(
            jax.random.PRNGKey(0), train_state.example_batch(task, 1)
        )
        step = jax.jit(
            functools.partial(train_state.train_step, task, tx, config),
            in_shardings=(state_sharding, batch_sharding, sharding.replicated(mesh)),
            out_shardings=(state_sharding, sharding.replicated(mesh)),
            donate_argnums=0,
        )
    it = input_pipeline.create_train_iterator(
        config.input, seed=0, process_index=0, process_count=1, tokenizer=task.tokenizer
    )

    def run(state, batches):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            for local in batches:
                batch = sharding.make_global_batch({k: local[k] for k in task.batch_spec()}, batch_sharding)
                state, metrics = step(state, batch, frozen)
        return state, metrics

    return task, run, state, it, frozen


@pytest.mark.parametrize('stage', ['b', 'c', 'c,backbone=stable_cascade'])
def test_stage_step_runs_sharded_on_8_devices(demo_root, stage):
    config = load_config('shapes', f'stage={stage},runlocal,root={demo_root}')
    config.input.data_dir = str(demo_root / 'data')
    task, run, state, it, _ = _sharded_step(config)
    state, metrics = run(state, [next(it)])
    assert int(state.step) == 1 and np.isfinite(float(metrics['loss']))
    network = 'decoder' if stage == 'b' else 'prior'
    specs = {str(leaf.sharding.spec) for leaf in jax.tree.leaves(state.params[network])}
    assert any('fsdp' in spec for spec in specs), specs  # FSDP really splits some weights


@pytest.mark.parametrize('backbone', ['wuerstchen', 'pixart', 'stable_cascade'])
def test_stage_c_overfits_a_few_captions(demo_root, backbone):
    """On 8 fixed images and captions, the held-out ε-MSE on them falls well below its start, with
    either backbone (the shapes prior predicts v; the ε path trains in the fine-tune and Stage B tests)."""
    config = load_config('shapes', f'stage=c,runlocal,root={demo_root},backbone={backbone}')
    assert config.diffusion.prediction == 'v'
    config.input.data_dir = str(demo_root / 'overfit_data')
    config.input.shapes.num_train = 8
    config.text.dropout = 0.0
    config.optimizer.lr, config.optimizer.schedule, config.optimizer.warmup_steps = 3e-3, 'constant', 0
    task, run, state, it, frozen = _sharded_step(config)
    batch = next(it)
    inputs = {k: jnp.asarray(batch[k]) for k in ('image', 'tokens', 'token_mask')}
    before = float(jnp.mean(task._eval_losses(jax.device_get(state.params), {}, jax.device_get(frozen), inputs)))
    state, _ = run(state, [batch] * 80)
    after = float(jnp.mean(task._eval_losses(jax.device_get(state.params), {}, jax.device_get(frozen), inputs)))
    assert after < 0.5 * before, (before, after)
