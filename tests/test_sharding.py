"""Mesh construction and logical-axis shardings on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from jax.sharding import PartitionSpec as P

from conftest import load_config
from wurst_jax import config_lib, lowering, sharding, tasks, train_state


def mesh_config(data, fsdp, tensor):
    return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


def test_mesh_fills_minus_one_and_uses_auto_axes():
    mesh = sharding.create_mesh(mesh_config(-1, 2, 1))
    assert dict(mesh.shape) == {'data': 4, 'fsdp': 2, 'tensor': 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize('sizes', [(3, -1, 1), (2, 2, 1), (16, 1, 1)])
def test_mesh_that_does_not_fit_the_devices_is_rejected(sizes):
    with pytest.raises(config_lib.ConfigError, match='config.mesh='):
        sharding.create_mesh(mesh_config(*sizes))


def stage_a_shardings(mesh_sizes):
    config = load_config('stage_a')
    config.mesh = mesh_config(*mesh_sizes)
    mesh = sharding.create_mesh(config.mesh)
    task = tasks.create(config)
    _, abstract, shardings = lowering.abstract_train_state(config, task, task.optimizer(), mesh, config.sharding_rules)
    return abstract, shardings


def test_partition_specs_of_known_params_on_4x2_mesh():
    abstract, shardings = stage_a_shardings((4, 2, 1))
    vq = jax.tree.map(lambda s: s.spec, shardings.params['vqgan'])
    # Würstchen's 384-wide bottleneck MLP: width split on fsdp, hidden on tensor.
    assert abstract.params['vqgan']['up_blocks_0']['channelwise_0']['kernel'].shape == (384, 1536)
    assert vq['up_blocks_0']['channelwise_0']['kernel'] == P('fsdp', 'tensor')
    assert vq['up_blocks_0']['channelwise_2']['kernel'] == P('tensor', 'fsdp')
    assert vq['in_conv']['kernel'] == P(None, None, None, 'fsdp')
    assert vq['down_blocks_1']['kernel'] == P(None, None, None, 'fsdp')
    assert vq['up_blocks_12']['kernel'] == P(None, None, 'fsdp', None)  # [kh, kw, out, in] after transpose
    assert vq['up_blocks_0']['depthwise']['kernel'] == P(None, None, None, None)
    assert vq['quantizer']['codebook'] == P(None, None)
    # Adam's moments are sharded like their params.
    mu = shardings.opt_state.inner_states['vqgan'].inner_state[1][0].mu['vqgan']
    assert mu['up_blocks_0']['channelwise_0']['kernel'].spec == P('fsdp', 'tensor')


def test_axes_that_do_not_divide_a_dim_are_dropped():
    _, shardings = stage_a_shardings((1, 8, 1))
    # out_conv maps 192 -> 12 channels; 12 does not split 8 ways, so it is replicated.
    assert shardings.params['vqgan']['out_conv']['kernel'].spec == P(None, None, None, None)
    assert shardings.params['vqgan']['in_conv']['kernel'].spec == P(None, None, None, 'fsdp')


def test_initialised_state_is_placed_as_specified(tiny_shapes_config):
    config = tiny_shapes_config
    config.mesh = mesh_config(4, 2, 1)
    mesh = sharding.create_mesh(config.mesh)
    task = tasks.create(config)
    init_fn, _, shardings = lowering.abstract_train_state(config, task, task.optimizer(), mesh, config.sharding_rules)
    import flax.linen as nn

    with jax.set_mesh(mesh):
        state = jax.jit(lambda r, x: nn.meta.unbox(init_fn(r, x)), out_shardings=shardings)(
            jax.random.PRNGKey(0), train_state.example_batch(task, 1)
        )
    kernel = state.params['vqgan']['up_blocks_0']['channelwise_0']['kernel']  # (16, 64)
    assert kernel.sharding.spec == P('fsdp', 'tensor')
    assert kernel.addressable_shards[0].data.shape == (8, 64)


def test_batch_sharding_splits_over_data_and_fsdp():
    mesh = sharding.create_mesh(mesh_config(4, 2, 1))
    bs = sharding.batch_sharding(mesh, config_lib.DEFAULT_SHARDING_RULES)
    batch = sharding.make_global_batch({'image': jnp.zeros((16, 4, 4, 3)).__array__()}, bs)
    assert batch['image'].shape == (16, 4, 4, 3)
    assert {s.data.shape for s in batch['image'].addressable_shards} == {(2, 4, 4, 3)}
