"""Ahead-of-time lowering of the train step: its abstract state and shardings from shapes alone,
the step lowered for a batch over the mesh, and XLA's FLOP count of it. The loop compiles what
`lower_train_step` returns; `wurst_jax.plan` and `bench/` lower without reading any weights."""

import functools
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import optax

from wurst_jax import convert, sharding, tasks
from wurst_jax.models import kernels
from wurst_jax.models.layers import DTYPES
from wurst_jax.tasks.base import Task
from wurst_jax.train_state import TrainState, create_train_state, example_batch, train_step


def abstract_train_state(
    config: ml_collections.ConfigDict, task: Task, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh, rules: Any
) -> tuple[Any, TrainState, Any]:
    """(init_fn, abstract state with shardings attached, state shardings), from jax.eval_shape only."""
    init_fn = functools.partial(create_train_state, task, tx)
    boxed = jax.eval_shape(init_fn, jax.random.PRNGKey(config.seed), example_batch(task, 1, abstract=True))
    state_sharding = sharding.logical_shardings(boxed, mesh, rules)
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.meta.unbox(boxed), state_sharding
    )
    return init_fn, abstract_state, state_sharding


def lower_train_step(
    config: ml_collections.ConfigDict,
    task: Task,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    abstract_state: TrainState,
    state_sharding: Any,
    frozen: Any,
    batch: dict[str, Any] | None = None,
) -> jax.stages.Lowered:
    """train_step lowered for the config's global batch over the mesh (or for the shapes of `batch`,
    e.g. an aspect bucket's); `frozen` may be arrays or ShapeDtypeStructs, either with their shardings.
    The state is donated: its buffers are reused for the new state."""
    rules = tuple(tuple(r) for r in config.sharding_rules)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    batch = batch or example_batch(task, config.input.batch_size, abstract=True)
    batch_spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding) for k, v in batch.items()}
    step_fn = jax.jit(
        functools.partial(train_step, task, tx, config),
        in_shardings=(state_sharding, batch_sharding, jax.tree.map(lambda a: a.sharding, frozen)),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return step_fn.lower(abstract_state, batch_spec, frozen)


def batch_signature(batch: dict[str, Any]) -> tuple:
    """What a compiled step is specialised to: each entry's shape and dtype."""
    return tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))


def lower_from_shapes(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
) -> tuple[jax.stages.Lowered, TrainState]:
    """(the train step lowered, the abstract state) without reading any weights: frozen networks
    come from their folders' config.json (`convert.shapes_only`)."""
    with convert.shapes_only():
        task = tasks.create(config)
    tx = task.optimizer()
    rules = tuple(tuple(r) for r in config.sharding_rules)
    _, abstract_state, state_sharding = abstract_train_state(config, task, tx, mesh, rules)
    boxed = task.frozen_params()
    frozen = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        nn.meta.unbox(boxed),
        sharding.logical_shardings(boxed, mesh, rules),
    )
    return lower_train_step(config, task, tx, mesh, abstract_state, state_sharding, frozen), abstract_state


def step_flops(config: ml_collections.ConfigDict, lowered: jax.stages.Lowered) -> float:
    """Model FLOPs of one train step over the whole mesh: XLA's count of the step before partitioning.

    XLA counts a loop body once and counts rematerialised work again, so a step whose blocks are an
    nn.scan, whose batch is accumulated over micro-batches, whose blocks are rematerialised or whose
    attention is blocked (`kernels.blocked_attention`, a loop over query blocks) or cuDNN's (a custom
    call XLA does not count) is counted from its plain twin; that twin, and a step lowered for a TPU
    topology (which gives no count here), are lowered from shapes alone on one CPU device: seconds,
    nothing compiled or loaded.
    """
    model = config.get('model', {})
    plain = (
        not model.get('scan_blocks', False)
        and model.get('remat_policy', 'none') == 'none'
        and config.grad_accum_steps == 1
        and kernels.attention_kernel(DTYPES[config.dtype]) not in ('blocked', 'cudnn')  # a loop; a custom call
    )
    cost = (lowered.cost_analysis() or {}) if plain else {}
    if 'flops' not in cost:
        counted = config.copy_and_resolve_references()
        counted.mesh.update(data=1, fsdp=1, tensor=1)
        counted.grad_accum_steps = 1
        if 'scan_blocks' in model:
            counted.model.scan_blocks = False
        if 'remat_policy' in model:
            counted.model.remat_policy = 'none'
        with kernels.forced_attention_kernel('einsum'):
            lowered, _ = lower_from_shapes(counted, sharding.create_mesh(counted.mesh, jax.devices('cpu')[:1]))
        cost = lowered.cost_analysis() or {}
    return float(cost.get('flops', 0.0))
