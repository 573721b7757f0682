"""The training loop, shared by every model family (`wurst_jax.tasks`).

Read top to bottom: mesh, task and optimizer, abstract state and shardings, input, checkpoint
restore or init, the compiled step, then the loop with logging, images, checkpoints and eval.
"""
import functools
import json
import logging
import os
import signal
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metric_writers, periodic_actions
from flax import traverse_util
from jax.experimental import multihost_utils

from wurst_jax import checkpoint, convert, optim, sharding, tasks, visualize
from wurst_jax.config_lib import ConfigError
from wurst_jax.data import input_pipeline, photos
from wurst_jax.models import layers


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # float32 master weights
    opt_state: Any
    ema_params: Any
    model_state: Any  # non-trained variables, e.g. BatchNorm statistics
    rng: jax.Array  # base key; each step folds in its step number, so resume needs no RNG state


def example_batch(task: Any, batch_size: int, *, abstract: bool = False) -> dict[str, Any]:
    """Zeros (or their ShapeDtypeStructs) shaped like the task's training batch."""
    make = jax.ShapeDtypeStruct if abstract else jnp.zeros
    return {k: make((batch_size, *shape), dtype) for k, (shape, dtype) in task.batch_spec().items()}


def create_train_state(task: Any, tx: optax.GradientTransformation, rng: jax.Array,
                       batch: dict[str, jax.Array]) -> TrainState:
    """A fresh train state from an example batch; params still carry their logical-axis boxes."""
    init_rng, state_rng = jax.random.split(rng)
    params, model_state = task.init(init_rng, batch)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=params, model_state=model_state, rng=state_rng)


def with_pretrained(task: Any, state: TrainState, state_sharding: Any) -> TrainState:
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
            raise ValueError(f'pretrained {name} does not fit the model the config builds: {wrong} are not in it '
                             'or have other shapes')
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


def accumulated_grads(task: Any, state: TrainState, frozen: dict[str, Any], batch: dict[str, jax.Array],
                      rng: jax.Array, micro_batches: int) -> tuple[Any, Any, dict[str, jax.Array]]:
    """task.grads, averaged over `micro_batches` slices of the batch computed one after another (a
    lax.scan), so activations are those of one slice. Row r goes to slice r % micro_batches, which
    keeps every device's rows on that device; model_state (BatchNorm statistics, loss buckets) is
    threaded through the slices in order."""
    if micro_batches == 1:
        return task.grads(state.params, state.model_state, frozen, batch, rng, state.step)
    slices = jax.tree.map(lambda x: jnp.moveaxis(x.reshape(x.shape[0] // micro_batches, micro_batches,
                                                           *x.shape[1:]), 1, 0), batch)

    def accumulate(carry, inputs):
        total, model_state = carry
        index, micro = inputs
        grads, model_state, metrics = task.grads(state.params, model_state, frozen, micro,
                                                 jax.random.fold_in(rng, index), state.step)
        return (jax.tree.map(jnp.add, total, grads), model_state), metrics

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (total, model_state), metrics = jax.lax.scan(accumulate, (zeros, state.model_state),
                                                 (jnp.arange(micro_batches), slices))
    return (jax.tree.map(lambda g: g / micro_batches, total), model_state,
            jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics))


def train_step(task: Any, tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
               state: TrainState, batch: dict[str, jax.Array],
               frozen: dict[str, Any]) -> tuple[TrainState, dict[str, jax.Array]]:
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
    metrics = dict(metrics, grad_norm=grad_norm, skipped=1 - finite.astype(jnp.int32),
                   learning_rate=optim.lr_schedule(config.optimizer, config.total_steps)(state.step))
    updated = state.replace(params=params, opt_state=opt_state, model_state=model_state,
                            ema_params=ema_update(state.ema_params, params, config.ema_decay, state.step))
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = state.replace(step=state.step + 1, params=keep(updated.params, state.params),
                              opt_state=keep(updated.opt_state, state.opt_state),
                              model_state=keep(updated.model_state, state.model_state),
                              ema_params=keep(updated.ema_params, state.ema_params))
    return new_state, metrics


def summarize(pending: list[dict[str, np.ndarray]], streak: int, limit: int) -> tuple[dict[str, float], int]:
    """(means over the finite steps since the last log plus the count of skipped ones, the run of
    skipped steps ending now); FloatingPointError once `limit` steps in a row were skipped."""
    stacked = {k: np.stack([np.asarray(m[k]) for m in pending]) for k in pending[0]}
    skipped = stacked.pop('skipped').astype(bool)
    for s in skipped:
        streak = streak + 1 if s else 0
        if streak >= limit:
            raise FloatingPointError(
                f'{streak} steps in a row had a non-finite loss or gradient (limit max_nonfinite_steps={limit}); '
                'the last checkpoint holds only finite values: lower optimizer.lr, raise optimizer.grad_clip '
                'or check the input pipeline, then rerun to resume')
    summary = {k: float(np.mean(v[~skipped])) if (~skipped).any() else float('nan') for k, v in stacked.items()}
    summary['skipped_steps'] = float(skipped.sum())
    return summary, streak


class PreemptionWatch:
    """Whether the run was asked to stop (SIGTERM, as schedulers and TPU maintenance send it).

    With several processes JAX's distributed runtime receives the signal and
    `reached_preemption_sync_point` makes every process agree on the same step; a single process
    installs its own handler for the duration of the `with` block.
    """

    def __enter__(self):
        self.signalled = False
        self._previous = None
        if jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame):
        del signum, frame
        self.signalled = True

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.signalled


def eval_batches(config: ml_collections.ConfigDict, tokenizer: Any = None) -> Any:
    """Held-out batches for evaluation, as named by config.eval.data."""
    if config.eval.data == 'astronaut_tiles':
        tiles = photos.astronaut_crops(config.input.image_size).astype(np.float32) / 127.5 - 1
        return [dict(image=tiles[i:i + config.eval.batch_size])
                for i in range(0, len(tiles), config.eval.batch_size)]
    return input_pipeline.create_eval_iterator(config.input, split=config.input.eval_split,
                                               batch_size=config.eval.batch_size,
                                               num_examples=config.eval.num_examples, tokenizer=tokenizer)


def check_batch_fits_mesh(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
    split = mesh.shape['data'] * mesh.shape['fsdp'] * config.grad_accum_steps
    if config.input.batch_size % split or config.input.batch_size % jax.process_count():
        raise ConfigError('input.batch_size', config.input.batch_size,
                          f'a multiple of data x fsdp x grad_accum_steps = {split} and of the process count '
                          f'{jax.process_count()}')


def _evaluate(task, config, state, frozen, writer, workdir: str) -> dict[str, float]:
    params = state.ema_params if config.eval.use_ema else state.params
    result = task.evaluate(params, state.model_state, frozen, eval_batches(config, task.tokenizer))
    step = int(state.step)
    writer.write_scalars(step, {f'eval/{k}': v for k, v in result.items()})
    if jax.process_index() == 0:
        with open(os.path.join(workdir, 'eval.jsonl'), 'a') as f:
            f.write(json.dumps(dict(step=step, **result)) + '\n')
    logging.info('eval at step %d: %s', step, result)
    return result


def _write_images(visualize_fn, config, state, frozen, writer, workdir: str, batch: dict[str, np.ndarray]) -> None:
    params = state.ema_params if config.eval.use_ema else state.params
    grid = visualize.image_grid(sharding.to_host(visualize_fn(params, state.model_state, frozen, batch)),
                                ncols=config.eval.grid_columns)
    step = int(state.step)
    writer.write_images(step, {'samples': grid[None]})
    if jax.process_index() == 0:
        visualize.save_png(os.path.join(workdir, f'samples_{step:07d}.png'), grid)


def abstract_train_state(config: ml_collections.ConfigDict, task: Any, tx: optax.GradientTransformation,
                         mesh: jax.sharding.Mesh, rules: Any) -> tuple[Any, TrainState, Any]:
    """(init_fn, abstract state with shardings attached, state shardings), from jax.eval_shape only."""
    init_fn = functools.partial(create_train_state, task, tx)
    boxed = jax.eval_shape(init_fn, jax.random.PRNGKey(config.seed), example_batch(task, 1, abstract=True))
    state_sharding = sharding.logical_shardings(boxed, mesh, rules)
    abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  nn.meta.unbox(boxed), state_sharding)
    return init_fn, abstract_state, state_sharding


def lower_train_step(config: ml_collections.ConfigDict, task: Any, tx: optax.GradientTransformation,
                     mesh: jax.sharding.Mesh, abstract_state: TrainState, state_sharding: Any,
                     frozen: Any, batch: dict[str, Any] | None = None) -> jax.stages.Lowered:
    """train_step lowered for the config's global batch over the mesh (or for the shapes of `batch`,
    e.g. an aspect bucket's); `frozen` may be arrays or ShapeDtypeStructs. The state is donated: its
    buffers are reused for the new state."""
    rules = tuple(tuple(r) for r in config.sharding_rules)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    batch = batch or example_batch(task, config.input.batch_size, abstract=True)
    batch_spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding) for k, v in batch.items()}
    step_fn = jax.jit(functools.partial(train_step, task, tx, config),
                      in_shardings=(state_sharding, batch_sharding, sharding.replicated(mesh)),
                      out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=0)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return step_fn.lower(abstract_state, batch_spec, frozen)


def batch_signature(batch: dict[str, Any]) -> tuple:
    """What a compiled step is specialised to: each entry's shape and dtype."""
    return tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))


def lower_from_shapes(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> tuple[jax.stages.Lowered, TrainState]:
    """(the train step lowered, the abstract state) without reading any weights: frozen networks
    come from their folders' config.json (`convert.shapes_only`)."""
    with convert.shapes_only():
        task = tasks.create(config)
    tx = task.optimizer()
    _, abstract_state, state_sharding = abstract_train_state(config, task, tx, mesh,
                                                             tuple(tuple(r) for r in config.sharding_rules))
    replicated = sharding.replicated(mesh)
    frozen = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), task.frozen_params())
    return lower_train_step(config, task, tx, mesh, abstract_state, state_sharding, frozen), abstract_state


def step_flops(config: ml_collections.ConfigDict, lowered: jax.stages.Lowered) -> float:
    """Model FLOPs of one train step over the whole mesh: XLA's count of the step before partitioning.

    XLA counts a loop body once and counts rematerialised work again, so a step whose blocks are an
    nn.scan, whose batch is accumulated over micro-batches, whose blocks are rematerialised or whose
    attention is blocked (`layers.blocked_attention`, a loop over query blocks) is counted from its
    plain twin; that twin, and a step lowered for a TPU topology (which gives no count here), are
    lowered from shapes alone on one CPU device: seconds, nothing compiled or loaded.
    """
    model = config.get('model', {})
    plain = (not model.get('scan_blocks', False) and model.get('remat_policy', 'none') == 'none'
             and config.grad_accum_steps == 1 and layers.attention_kernel() != 'blocked')
    cost = (lowered.cost_analysis() or {}) if plain else {}
    if 'flops' not in cost:
        counted = config.copy_and_resolve_references()
        counted.mesh.update(data=1, fsdp=1, tensor=1)
        counted.grad_accum_steps = 1
        if 'scan_blocks' in model:
            counted.model.scan_blocks = False
        if 'remat_policy' in model:
            counted.model.remat_policy = 'none'
        with layers.forced_attention_kernel('einsum'):
            lowered, _ = lower_from_shapes(counted, sharding.create_mesh(counted.mesh, jax.devices('cpu')[:1]))
        cost = lowered.cost_analysis() or {}
    return float(cost.get('flops', 0.0))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains config.model_family for config.total_steps, resuming from workdir's latest checkpoint."""
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        checkpoint.clear_complete(workdir)
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)

    # -- Mesh, task, optimizer ---------------------------------------------------------------------
    mesh = sharding.create_mesh(config.mesh)
    rules = tuple(tuple(r) for r in config.sharding_rules)
    check_batch_fits_mesh(config, mesh)
    task = tasks.create(config)
    tx = task.optimizer()
    logging.info('mesh %s over %d devices', dict(mesh.shape), mesh.size)

    # -- Abstract state and shardings (nothing allocated yet) --------------------------------------
    init_fn, abstract_state, state_sharding = abstract_train_state(config, task, tx, mesh, rules)
    sharding.log_param_shardings(abstract_state.params, state_sharding.params)
    logging.info('params: %s', f'{sum(x.size for x in jax.tree.leaves(abstract_state.params)):,}')
    batch_sharding = sharding.batch_sharding(mesh, rules)

    # -- Input -------------------------------------------------------------------------------------
    train_iter = input_pipeline.create_train_iterator(
        config.input, seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count(),
        tokenizer=task.tokenizer)

    # -- Restore or initialise ---------------------------------------------------------------------
    manager = checkpoint.create_manager(os.path.join(workdir, 'checkpoints'), max_to_keep=config.keep_checkpoints)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        restored = checkpoint.restore_latest(manager, abstract_state=abstract_state, data_iterator=train_iter)
        if restored is None:
            unboxed_init = lambda r, x: nn.meta.unbox(init_fn(r, x))
            state = jax.jit(unboxed_init, out_shardings=state_sharding)(
                jax.random.PRNGKey(config.seed), example_batch(task, 1))
            state = with_pretrained(task, state, state_sharding)
        else:
            state = restored[1]
    start_step = int(state.step)

    # -- Compiled step -----------------------------------------------------------------------------
    # Frozen networks are read from local files once, and passed to every step, never saved.
    frozen = jax.device_put(task.frozen_params(), sharding.replicated(mesh))
    lowered = lower_train_step(config, task, tx, mesh, abstract_state, state_sharding, frozen)
    t0 = time.time()
    # One executable per batch shape: a single one, or one per aspect bucket as batches arrive.
    compiled = {batch_signature(example_batch(task, config.input.batch_size, abstract=True)): lowered.compile()}
    flops = step_flops(config, lowered)
    logging.info('train step compiled in %.1f s; %.3g FLOP per step over %d devices', time.time() - t0, flops,
                 mesh.size)

    def compiled_step(batch):
        signature = batch_signature(batch)
        if signature not in compiled:
            compiled[signature] = lower_train_step(config, task, tx, mesh, abstract_state, state_sharding, frozen,
                                                   batch).compile()
            logging.info('compiled the train step for batch shapes %s', signature)
        return compiled[signature]

    # -- Loop --------------------------------------------------------------------------------------
    hooks = [periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer,
                                             every_steps=config.log_every_steps)]
    if config.profile.num_steps > 0 and jax.process_index() == 0:
        hooks.append(periodic_actions.Profile(logdir=workdir, first_profile=config.profile.first_step,
                                              num_profile_steps=config.profile.num_steps))
    # Compiled once, reused at every image step; replicated so every process can read the grid.
    visualize_fn = jax.jit(task.visualize, out_shardings=sharding.replicated(mesh))
    image_batch = next(iter(eval_batches(config, task.tokenizer)))
    batch_keys = tuple(task.batch_spec())
    image_batch = {k: np.asarray(image_batch[k][:config.eval.num_grid_images]) for k in batch_keys}
    pending_metrics, last_log, nonfinite_streak = [], (time.time(), start_step), 0
    ids_file = (open(os.path.join(workdir, 'batch_ids.txt'), 'a')
                if config.record_batch_ids and jax.process_index() == 0 else None)
    preempted = False
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules), PreemptionWatch() as preemption:
        for step in range(start_step + 1, config.total_steps + 1):
            with jax.profiler.StepTraceAnnotation('train', step_num=step):
                local = next(train_iter)
                if ids_file:
                    ids_file.write(f'{step} ' + ' '.join(map(str, local['id'].tolist())) + '\n')
                batch = sharding.make_global_batch({k: local[k] for k in batch_keys}, batch_sharding)
                state, metrics = compiled_step(batch)(state, batch, frozen)
                pending_metrics.append(metrics)
            for hook in hooks:
                hook(step)
            if step % config.log_every_steps == 0 or step == config.total_steps:
                # The only host sync of the loop: fetch the metrics accumulated since the last log.
                summary, nonfinite_streak = summarize(jax.device_get(pending_metrics), nonfinite_streak,
                                                      config.max_nonfinite_steps)
                now = time.time()
                summary['images_per_sec'] = (step - last_log[1]) * config.input.batch_size / (now - last_log[0])
                if flops:
                    summary['device_gflops_per_sec'] = (
                        (step - last_log[1]) * flops / mesh.size / (now - last_log[0]) / 1e9)
                writer.write_scalars(step, summary)
                pending_metrics, last_log = [], (now, step)
            preempted = preemption.reached(step)
            if step % config.image_every_steps == 0 and not preempted:
                _write_images(visualize_fn, config, state, frozen, writer, workdir, image_batch)
            if (config.eval_every_steps and step % config.eval_every_steps == 0 and step != config.total_steps
                    and not preempted):
                _evaluate(task, config, state, frozen, writer, workdir)
            if step % config.checkpoint_every_steps == 0 or step == config.total_steps or preempted:
                checkpoint.save(manager, step, state=state, data_iterator=train_iter, config=config)
            if preempted:
                logging.warning('preempted (SIGTERM) at step %d: saved a checkpoint; rerun the same command '
                                'to resume', step)
                break
        if ids_file:
            ids_file.close()
        if not preempted:
            if start_step < config.total_steps and config.total_steps % config.image_every_steps:
                _write_images(visualize_fn, config, state, frozen, writer, workdir, image_batch)
            _evaluate(task, config, state, frozen, writer, workdir)
    checkpoint.wait(manager)
    writer.flush()
    if not preempted and jax.process_index() == 0:
        checkpoint.mark_complete(workdir, config.total_steps)
    return state
