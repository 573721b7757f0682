"""The training loop on 8 fake CPU devices: learning, gradient accumulation, mesh presets. Exact
resume in a new process, after kills at random moments, is tests/test_faults.py."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wurst_jax import lowering, sharding, tasks, train_state
from wurst_jax.data import input_pipeline


def test_stage_a_loss_falls_on_4x2_mesh(tiny_shapes_config):
    config = tiny_shapes_config
    config.mesh.data, config.mesh.fsdp = 4, 2
    config.loss.adv_weight = 0.0
    config.optimizer.lr, config.optimizer.schedule, config.optimizer.warmup_steps = 3e-3, 'constant', 0
    mesh = sharding.create_mesh(config.mesh)
    task = tasks.create(config)
    tx = task.optimizer()
    init_fn, _, state_sharding = lowering.abstract_train_state(config, task, tx, mesh, config.sharding_rules)
    batch_sharding = sharding.batch_sharding(mesh, config.sharding_rules)
    it = input_pipeline.create_train_iterator(config.input, seed=0, process_index=0, process_count=1)
    losses = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(config.sharding_rules):
        state = jax.jit(lambda r, x: nn.meta.unbox(init_fn(r, x)), out_shardings=state_sharding)(
            jax.random.PRNGKey(0), train_state.example_batch(task, 1)
        )
        step = jax.jit(
            functools.partial(train_state.train_step, task, tx, config),
            in_shardings=(state_sharding, batch_sharding, sharding.replicated(mesh)),
            out_shardings=(state_sharding, sharding.replicated(mesh)),
            donate_argnums=0,
        )
        for _ in range(25):
            batch = sharding.make_global_batch({'image': next(it)['image']}, batch_sharding)
            state, metrics = step(state, batch, {})
            losses.append(float(metrics['mse']))
    assert int(state.step) == 25
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3]), losses
    kernel = state.params['vqgan']['up_blocks_0']['channelwise_0']['kernel']
    assert kernel.sharding.spec == jax.sharding.PartitionSpec('fsdp', 'tensor')


def test_gradient_accumulation_averages_micro_batch_gradients():
    """On a per-row mean loss, 4 micro-batches give the full-batch gradient; model_state is threaded."""

    class LinearTask:
        def grads(self, params, model_state, frozen, batch, rng, step):
            loss_fn = lambda p: jnp.mean((batch['x'] @ p['w'] - batch['y']) ** 2)
            loss, grads = jax.value_and_grad(loss_fn)(params)
            return grads, {'seen': model_state['seen'] + batch['x'].shape[0]}, {'loss': loss}

    params = {'w': jax.random.normal(jax.random.PRNGKey(0), (3, 2))}
    state = train_state.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=None,
        ema_params=params,
        model_state={'seen': jnp.zeros((), jnp.int32)},
        rng=jax.random.PRNGKey(1),
    )
    batch = {
        'x': jax.random.normal(jax.random.PRNGKey(2), (8, 3)),
        'y': jax.random.normal(jax.random.PRNGKey(3), (8, 2)),
    }
    full = train_state.accumulated_grads(LinearTask(), state, {}, batch, state.rng, 1)
    micro = jax.jit(lambda s, b: train_state.accumulated_grads(LinearTask(), s, {}, b, s.rng, 4))(state, batch)
    np.testing.assert_allclose(micro[0]['w'], full[0]['w'], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(micro[2]['loss'], full[2]['loss'], rtol=1e-5)
    assert int(micro[1]['seen']) == 8


def test_mesh_presets():
    from wurst_jax import config_lib

    assert dict(config_lib.mesh_preset('dp')) == {'data': -1, 'fsdp': 1, 'tensor': 1}
    assert dict(config_lib.mesh_preset('fsdp_tp', tensor=4)) == {'data': 1, 'fsdp': -1, 'tensor': 4}
    devices = np.array(jax.devices()[:8])
    mesh = sharding.create_mesh(config_lib.mesh_preset('fsdp_tp', tensor=2), devices)
    assert dict(mesh.shape) == {'data': 1, 'fsdp': 4, 'tensor': 2}
    with pytest.raises(config_lib.ConfigError, match='tensor'):
        config_lib.mesh_preset('fsdp', tensor=2)
