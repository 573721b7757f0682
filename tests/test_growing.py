"""Greedy growing (configs/growing.py:runlocal on 8 fake CPU devices): a Shallow-UViT core trained at
16 px, grown to 32 px with the core frozen through the real training loop, then grown again to 64 px."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import load_config
from wurst_jax import checkpoint, config_lib, growing, lowering, sharding, tasks, train, train_state
from wurst_jax.data import input_pipeline
from wurst_jax.diffusion import schedule


def runlocal(arm: str, tmp_path, **grow) -> ml_collections.ConfigDict:
    config = load_config('growing', f'arm={arm},runlocal')
    config.input.data_dir = str(tmp_path / 'data')
    config.grow.update(grow)
    return config


@pytest.fixture(scope='module')
def core_run(tmp_path_factory):
    """(workdir, config, init params) of a Shallow-UViT core at 16 px, saved the way a run saves its
    checkpoints (growing reads nothing else). The saved params stand for trained ones: each leaf is
    its init plus its own noise, so a carry-over that copied nothing (the grown model's init, from
    the same key and paths) or swapped same-shaped leaves cannot match them."""
    root = tmp_path_factory.mktemp('growing')
    config = runlocal('core', root)
    task = tasks.create(config)
    state = nn.meta.unbox(train_state.create_train_state(task, task.optimizer(), jax.random.PRNGKey(0), None))
    fresh = state.params
    rng = np.random.default_rng(1)
    trained = jax.tree.map(lambda a: a + 0.1 * rng.standard_normal(a.shape).astype(a.dtype), fresh)
    state = state.replace(params=trained, ema_params=trained)
    data = input_pipeline.create_train_iterator(
        config.input, seed=0, process_index=0, process_count=1, tokenizer=task.tokenizer
    )
    manager = checkpoint.create_manager(str(root / 'core' / 'checkpoints'), max_to_keep=1)
    checkpoint.save(manager, 1, state=state, data_iterator=data, config=config)
    checkpoint.wait(manager)
    return str(root / 'core'), config, jax.device_get(fresh)


@pytest.fixture(scope='module')
def grown_run(core_run, tmp_path_factory):
    """(workdir, config) of 4 phase-1 steps of the 32 px UNet grown from core_run, on a 4x2 mesh."""
    root = tmp_path_factory.mktemp('grown')
    config = runlocal('grow', root, from_workdir=core_run[0], phase=1)
    config.mesh.data, config.mesh.fsdp = 4, 2
    tasks.validate(config)
    train.train_and_evaluate(config, str(root / 'grow'))
    return str(root / 'grow'), config


def test_shifted_schedule_moves_logsnr_by_twice_the_log_size_ratio():
    t = np.linspace(0.2, 0.8, 7)
    lsnr_64, lsnr_16 = schedule.shifted_cosine_logsnr(t, 64), schedule.shifted_cosine_logsnr(t, 16)
    np.testing.assert_allclose(lsnr_64, -2 * np.log(np.tan(np.pi * t / 2)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lsnr_16 - lsnr_64, 2 * np.log(4), rtol=1e-5)
    # The cosine-schedule time the network sees has exactly that noise level.
    np.testing.assert_allclose(schedule.logsnr(schedule.shifted_cosine_time(t, 16)), lsnr_16, atol=1e-3)
    assert float(schedule.shifted_cosine_logsnr(1.0, 16)) == -15
    assert float(schedule.shifted_cosine_logsnr(0.0, 64)) == 15


def test_phase1_training_leaves_core_and_text_encoder_bit_identical(core_run, grown_run):
    core_params = checkpoint.load_params(core_run[0], ema=True)
    grown = checkpoint.load_params(grown_run[0])
    grown_ema = checkpoint.load_params(grown_run[0], ema=True)
    for params in (grown, grown_ema):
        jax.tree.map(np.testing.assert_array_equal, params['core'], core_params['core'])
        jax.tree.map(np.testing.assert_array_equal, params['text'], core_params['text'])
    # ... and they are the core run's "trained" values, off the init that same key gives everywhere.
    for name in ('core', 'text'):
        assert jax.tree.structure(core_run[2][name]) == jax.tree.structure(grown[name])
        for init, carried in zip(jax.tree.leaves(core_run[2][name]), jax.tree.leaves(grown[name])):
            assert np.all(np.asarray(init) != carried)
    # The shallow layers are gone; the new levels and the zero-initialised exit have trained.
    assert {'entry', 'encoder', 'decoder', 'exit', 'core'} == set(core_params) - {'text'}
    assert {
        'entry',
        'exit',
        'core',
        'encoder_0',
        'down_0',
        'up_0',
        'decoder_0',
        'encoder_1',
        'down_1',
        'up_1',
        'decoder_1',
    } == set(grown) - {'text'}
    assert np.abs(grown['exit']['kernel']).max() > 0
    assert grown['entry']['kernel'].shape == (3, 3, 3, 8)  # the outermost width, 32 px


def test_phase2_optimizer_moves_the_core_and_phase1_does_not(core_run, tmp_path):
    updates, params = {}, None
    for phase in (1, 2):
        config = runlocal('grow', tmp_path, from_workdir=core_run[0], phase=phase)
        config.optimizer.update(schedule='constant', warmup_steps=0)
        task = tasks.create(config)
        # Any values do: the test is about which leaves the optimizer moves (eval_shape compiles nothing).
        params = params or jax.tree.map(
            lambda a: jnp.ones(a.shape, a.dtype), nn.meta.unbox(jax.eval_shape(task.init, jax.random.PRNGKey(0))[0])
        )
        tx = task.optimizer()
        grads = jax.tree.map(jnp.ones_like, params)
        updates[phase], _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(grads, params)
    for tree, moved in ((updates[1], False), (updates[2], True)):
        for name in ('core', 'text'):
            assert all(bool(jnp.any(u != 0)) == moved for u in jax.tree.leaves(tree[name]))
        assert bool(jnp.any(tree['encoder_1']['res']['channelwise_0']['kernel'] != 0))


def test_second_growth_to_64px_keeps_grown_levels_and_trains_sharded(grown_run, tmp_path):
    """32 -> 64 px: a third level outward; the sharded (data 4 x fsdp 2) step moves only the new layers."""
    config = runlocal('grow', tmp_path, from_workdir=grown_run[0], phase=1)
    config.input.image_size = 64
    config.model.level_channels = (16, 8, 8)
    config.mesh.data, config.mesh.fsdp = 4, 2
    config.optimizer.update(schedule='constant', warmup_steps=0)
    tasks.validate(config)
    task = tasks.create(config)
    carried = growing.carried_modules(load_config('growing', 'arm=grow,runlocal')) + ('text',)
    mesh = sharding.create_mesh(config.mesh)
    rules = config.sharding_rules
    tx = task.optimizer()
    init_fn, _, state_sharding = lowering.abstract_train_state(config, task, tx, mesh, rules)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    rng = np.random.default_rng(0)
    encoded = task.tokenizer(['a red circle on the left'] * 8)
    batch = {
        'image': rng.uniform(-1, 1, (8, 64, 64, 3)).astype(np.float32),
        'tokens': encoded['input_ids'],
        'token_mask': encoded['attention_mask'],
    }
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = jax.jit(lambda r, x: nn.meta.unbox(init_fn(r, x)), out_shardings=state_sharding)(
            jax.random.PRNGKey(0), train_state.example_batch(task, 1)
        )
        state = train_state.with_pretrained(task, state, state_sharding)
        before = jax.device_get(state.params)
        out = jax.eval_shape(
            task.denoiser_output,
            state.params,
            jnp.ones((2, 64, 64, 3)),
            jnp.full((2,), 0.5),
            jnp.zeros((2, config.text.max_length, task.text.width)),
        )
        step = jax.jit(
            functools.partial(train_state.train_step, task, tx, config),
            in_shardings=(state_sharding, batch_sharding, sharding.replicated(mesh)),
            out_shardings=(state_sharding, sharding.replicated(mesh)),
            donate_argnums=0,
        )
        state, metrics = step(state, sharding.make_global_batch(batch, batch_sharding), {})
    assert out.shape == (2, 64, 64, 3)
    source = checkpoint.load_params(grown_run[0], ema=True)
    for name in carried:
        jax.tree.map(np.testing.assert_array_equal, before[name], source[name])
    assert before['encoder_2']['res']['channelwise_0']['kernel'].shape == (8, 32)
    assert before['down_2']['kernel'].shape == (2, 2, 8, 8)  # 64 -> 32 px into level 1's width
    assert before['up_2']['kernel'].shape == (2, 2, 8, 8)
    assert before['decoder_2']['res']['channelwise_0']['kernel'].shape == (16, 32)  # concatenated skip
    assert before['entry']['kernel'].shape == (3, 3, 3, 8)
    assert np.isfinite(float(metrics['loss'])) and int(metrics['skipped']) == 0
    after = jax.device_get(state.params)
    for name in carried:
        jax.tree.map(np.testing.assert_array_equal, after[name], before[name])
    # The exit starts at zero, so the first step's gradient reaches only the exit.
    assert np.any(after['exit']['kernel'] != before['exit']['kernel'])
    assert state.params['encoder_2']['res']['channelwise_0']['kernel'].sharding.spec[0] == 'fsdp'


def test_growing_from_an_incompatible_run_is_a_config_error(core_run, tmp_path):
    wider = runlocal('grow', tmp_path, from_workdir=core_run[0])
    wider.model.c = 32
    with pytest.raises(config_lib.ConfigError, match=r'grow\.from_workdir.*model\.c=32.*it has 16'):
        tasks.validate(wider)
    other_family = load_config('shapes', 'stage=c,runlocal')
    with pytest.raises(config_lib.ConfigError, match=r"grow\.from_workdir.*'pixel' run.*'stage_c'"):
        growing.check_growable(runlocal('grow', tmp_path, from_workdir='elsewhere'), other_family)
    wrong_grid = runlocal('grow', tmp_path, from_workdir=core_run[0])
    wrong_grid.input.image_size = 64  # two levels down from 64 px is 16x16, not the core's 8x8
    with pytest.raises(config_lib.ConfigError, match=r'input\.image_size=64.*8x8'):
        tasks.validate(wrong_grid)
    with pytest.raises(config_lib.ConfigError, match=r'grow\.from_workdir.*no checkpoint'):
        tasks.validate(runlocal('grow', tmp_path, from_workdir=str(tmp_path / 'missing')))


@pytest.mark.parametrize(
    'arg, field', [('arm=grow,depth=8', 'depth'), ('arm=scratch,depth=2', 'depth'), ('arm=core,data=scarce', 'data')]
)
def test_an_argument_the_arm_does_not_take_is_a_config_error(arg, field):
    with pytest.raises(config_lib.ConfigError, match=rf'<arg>\.{field}=.*only arm='):
        load_config('growing', arg)
    assert load_config('growing', 'arm=grow,data=scarce').input.shapes.num_train == 512
    assert load_config('growing', 'arm=core,depth=8').model.depth == 8


def test_phase1_step_computes_no_weight_gradients_for_the_frozen_core(core_run, tmp_path):
    """Phase 1's compiled step is cheaper than phase 2's by the frozen core's weight gradients."""
    flops = {}
    for phase in (1, 2):
        config = runlocal('grow', tmp_path, from_workdir=core_run[0], phase=phase)
        config.mesh.update(data=1, fsdp=1, tensor=1)
        mesh = sharding.create_mesh(config.mesh, jax.devices('cpu')[:1])
        lowered, _ = lowering.lower_from_shapes(config, mesh)
        flops[phase] = lowering.step_flops(config, lowered)
    assert flops[1] < 0.97 * flops[2], flops
    params = {'core': {'w': jnp.ones(3)}, 'text': {'w': jnp.ones(3)}, 'exit': {'w': jnp.ones(3)}}
    grads = jax.grad(
        lambda p: sum(jnp.sum(x**2) for x in jax.tree.leaves(growing.stop_frozen_gradients(p, ('core',))))
    )(params)
    assert float(jnp.abs(grads['core']['w']).sum()) == 0 and float(jnp.abs(grads['text']['w']).sum()) == 0
    np.testing.assert_array_equal(grads['exit']['w'], 2 * np.ones(3))


def test_phase2_continues_a_phase1_run_with_every_param_and_trains_the_core(grown_run, tmp_path):
    config = runlocal('grow', tmp_path, from_workdir=grown_run[0], phase=2)
    tasks.validate(config)
    task = tasks.create(config)
    carried = task.pretrained_params()
    source = checkpoint.load_params(grown_run[0], ema=True)
    assert set(carried) == set(source)
    jax.tree.map(np.testing.assert_array_equal, carried, source)
    assert growing.frozen_modules(config) == ()
    params = nn.meta.unbox(jax.eval_shape(task.init, jax.random.PRNGKey(0))[0])
    assert jax.tree.structure(params) == jax.tree.structure(jax.device_get(source))
    config.optimizer.update(schedule='constant', warmup_steps=0)
    tx = task.optimizer()
    ones = jax.tree.map(lambda a: jnp.ones(a.shape, a.dtype), params)
    updates, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(ones, ones)
    assert all(bool(jnp.any(u != 0)) for u in jax.tree.leaves(updates['core']))
    with pytest.raises(config_lib.ConfigError, match=r'grow\.phase=1.*phase 1 would freeze all of it'):
        tasks.validate(runlocal('grow', tmp_path, from_workdir=grown_run[0], phase=1))
