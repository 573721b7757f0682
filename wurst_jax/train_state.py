"""The training step every model family shares (`wurst_jax.tasks`): the train state, its
initialisation (fresh or from pretrained weights), EMA, gradient accumulation over micro-batches,
and `train_step`, which `jax.jit` compiles over the mesh (`wurst_jax.lowering`)."""

import logging
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util

from wurst_jax import optim
from wurst_jax.tasks.base import Task


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # float32 master weights
    opt_state: Any
    ema_params: Any
    model_state: Any  # non-trained variables, e.g. BatchNorm statistics
    rng: jax.Array  # base key; each step folds in its step number, so resume needs no RNG state


def example_batch(task: Task, batch_size: int, *, abstract: bool = False) -> dict[str, Any]:
    """Zeros (or their ShapeDtypeStructs) shaped like the task's training batch."""
    make = jax.ShapeDtypeStruct if abstract else jnp.zeros
    return {k: make((batch_size, *shape), dtype) for k, (shape, dtype) in task.batch_spec().items()}


def create_train_state(
    task: Task, tx: optax.GradientTransformation, rng: jax.Array, batch: dict[str, jax.Array]
) -> TrainState:
    """A fresh train state from an example batch; params still carry their logical-axis boxes."""
    init_rng, state_rng = jax.random.split(rng)
    params, model_state = task.init(init_rng, batch)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ema_params=params,
        model_state=model_state,
        rng=state_rng,
    )


def with_pretrained(task: Task, state: TrainState, state_sharding: Any) -> TrainState:
    """A fresh state whose networks named by `task.pretrained_params()` (fine-tuning, or the next stage
    of a training plan) start from those weights, in params and EMA alike; the optimizer moments start
    at zero either way. Params the loaded network lacks (a layer the new stage adds, e.g. PixArtMS's
    size embedders) keep their initialisation and are logged; any other mismatch is an error."""
    pretrained = task.pretrained_params()
    if not pretrained:
        return state
    params = dict(state.params)
    for name, loaded in pretrained.items():
        want = traverse_util.flatten_dict(nn.meta.unbox(params[name]))
        got = traverse_util.flatten_dict(loaded)
        wrong = sorted('/'.join(k) for k in got if k not in want or want[k].shape != got[k].shape)
        if wrong:
            raise ValueError(
                f'pretrained {name} does not fit the model the config builds: {wrong} are not in it '
                'or have other shapes'
            )
        new = sorted('/'.join(k) for k in want if k not in got)
        if new:
            logging.warning('pretrained %s lacks %s: they start from their initialisation', name, new)
        params[name] = traverse_util.unflatten_dict({k: got.get(k, v).astype(v.dtype) for k, v in want.items()})
    params = jax.device_put(params, state_sharding.params)
    ema = jax.tree.map(jnp.copy, params)  # separate buffers: the step donates the state
    logging.info('started %s from pretrained weights', sorted(pretrained))
    return state.replace(params=params, ema_params=ema)


def ema_update(ema: Any, params: Any, decay: float, step: jax.Array) -> Any:
    """EMA with the usual warm-up decay min(decay, (1 + step) / (10 + step)) so early EMA tracks params.

    Written e + (1 − d)·(p − e), not d·e + (1 − d)·p: a param the step left unchanged (frozen while
    growing) then keeps its EMA bit for bit, where the other form drifts by rounding."""
    d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return jax.tree.map(lambda e, p: e + (1 - d) * (p - e), ema, params)


def accumulated_grads(
    task: Task,
    state: TrainState,
    frozen: dict[str, Any],
    batch: dict[str, jax.Array],
    rng: jax.Array,
    micro_batches: int,
) -> tuple[Any, Any, dict[str, jax.Array]]:
    """task.grads, averaged over `micro_batches` slices of the batch computed one after another (a
    lax.scan), so activations are those of one slice. Row r goes to slice r % micro_batches, which
    keeps every device's rows on that device; model_state (BatchNorm statistics, loss buckets) is
    threaded through the slices in order."""
    if micro_batches == 1:
        return task.grads(state.params, state.model_state, frozen, batch, rng, state.step)
    slices = jax.tree.map(
        lambda x: jnp.moveaxis(x.reshape(x.shape[0] // micro_batches, micro_batches, *x.shape[1:]), 1, 0), batch
    )

    def accumulate(carry, inputs):
        total, model_state = carry
        index, micro = inputs
        grads, model_state, metrics = task.grads(
            state.params, model_state, frozen, micro, jax.random.fold_in(rng, index), state.step
        )
        return (jax.tree.map(jnp.add, total, grads), model_state), metrics

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (total, model_state), metrics = jax.lax.scan(
        accumulate, (zeros, state.model_state), (jnp.arange(micro_batches), slices)
    )
    return (
        jax.tree.map(lambda g: g / micro_batches, total),
        model_state,
        jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics),
    )


def train_step(
    task: Task,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    state: TrainState,
    batch: dict[str, jax.Array],
    frozen: dict[str, Any],
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step; `frozen` holds networks used but not trained. Metrics stay on device.

    A step whose loss or gradient is not finite changes nothing but the step count (its batch is
    consumed) and reports skipped=1, so params never hold non-finite values.
    """
    rng = jax.random.fold_in(state.rng, state.step)
    grads, model_state, metrics = accumulated_grads(task, state, frozen, batch, rng, config.grad_accum_steps)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(
        metrics,
        grad_norm=grad_norm,
        skipped=1 - finite.astype(jnp.int32),
        learning_rate=optim.learning_rate(config, state.step),
    )
    updated = state.replace(
        params=params,
        opt_state=opt_state,
        model_state=model_state,
        ema_params=ema_update(state.ema_params, params, config.ema_decay, state.step),
    )
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = state.replace(
        step=state.step + 1,
        params=keep(updated.params, state.params),
        opt_state=keep(updated.opt_state, state.opt_state),
        model_state=keep(updated.model_state, state.model_state),
        ema_params=keep(updated.ema_params, state.ema_params),
    )
    return new_state, metrics
