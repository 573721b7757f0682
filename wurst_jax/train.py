"""The training loop, shared by every model family (`wurst_jax.tasks`).

Read top to bottom: mesh, task and optimizer, abstract state and shardings, input, checkpoint
restore or init, the compiled step, then the loop with logging, images, checkpoints and eval.
"""

import json
import logging
import os
import signal
import time

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from clu import metric_writers, periodic_actions
from jax.experimental import multihost_utils

from wurst_jax import checkpoint, sharding, tasks, visualize
from wurst_jax.config_lib import ConfigError
from wurst_jax.data import input_pipeline
from wurst_jax.lowering import abstract_train_state, batch_signature, lower_train_step, step_flops
from wurst_jax.tasks.base import Task
from wurst_jax.train_state import TrainState, example_batch, with_pretrained


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
                'or check the input pipeline, then rerun to resume'
            )
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


def check_batch_fits_mesh(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
    split = mesh.shape['data'] * mesh.shape['fsdp'] * config.grad_accum_steps
    if config.input.batch_size % split or config.input.batch_size % jax.process_count():
        raise ConfigError(
            'input.batch_size',
            config.input.batch_size,
            f'a multiple of data x fsdp x grad_accum_steps = {split} and of the process count {jax.process_count()}',
        )


def _evaluate(task: Task, config, state: TrainState, frozen, writer, workdir: str) -> dict[str, float]:
    params = state.ema_params if config.eval.use_ema else state.params
    result = task.evaluate(params, state.model_state, frozen, input_pipeline.eval_batches(config, task.tokenizer))
    step = int(state.step)
    writer.write_scalars(step, {f'eval/{k}': v for k, v in result.items()})
    if jax.process_index() == 0:
        with open(os.path.join(workdir, 'eval.jsonl'), 'a') as f:
            f.write(json.dumps(dict(step=step, **result)) + '\n')
    logging.info('eval at step %d: %s', step, result)
    return result


def _write_images(visualize_fn, config, state, frozen, writer, workdir: str, batch: dict[str, np.ndarray]) -> None:
    params = state.ema_params if config.eval.use_ema else state.params
    grid = visualize.image_grid(
        sharding.to_host(visualize_fn(params, state.model_state, frozen, batch)), ncols=config.eval.grid_columns
    )
    step = int(state.step)
    writer.write_images(step, {'samples': grid[None]})
    if jax.process_index() == 0:
        visualize.save_png(os.path.join(workdir, f'samples_{step:07d}.png'), grid)


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
        config.input,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        tokenizer=task.tokenizer,
    )

    # -- Restore or initialise ---------------------------------------------------------------------
    manager = checkpoint.create_manager(os.path.join(workdir, 'checkpoints'), max_to_keep=config.keep_checkpoints)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        restored = checkpoint.restore_latest(manager, abstract_state=abstract_state, data_iterator=train_iter)
        if restored is None:
            unboxed_init = lambda r, x: nn.meta.unbox(init_fn(r, x))
            state = jax.jit(unboxed_init, out_shardings=state_sharding)(
                jax.random.PRNGKey(config.seed), example_batch(task, 1)
            )
            state = with_pretrained(task, state, state_sharding)
        else:
            state = restored[1]
    start_step = int(state.step)

    # -- Compiled step -----------------------------------------------------------------------------
    # Frozen networks are read from local files once, and passed to every step, never saved: replicated,
    # except those boxed with logical axes (a LoRA base), sharded as params are.
    if isinstance(task, tasks.LoraTask):
        task.check_base(workdir)
    frozen = task.frozen_params()
    frozen = jax.device_put(nn.meta.unbox(frozen), sharding.logical_shardings(frozen, mesh, rules))
    lowered = lower_train_step(config, task, tx, mesh, abstract_state, state_sharding, frozen)
    t0 = time.time()
    # One executable per batch shape: a single one, or one per aspect bucket as batches arrive.
    compiled = {batch_signature(example_batch(task, config.input.batch_size, abstract=True)): lowered.compile()}
    flops = step_flops(config, lowered)
    logging.info(
        'train step compiled in %.1f s; %.3g FLOP per step over %d devices', time.time() - t0, flops, mesh.size
    )

    def compiled_step(batch):
        signature = batch_signature(batch)
        if signature not in compiled:
            compiled[signature] = lower_train_step(
                config, task, tx, mesh, abstract_state, state_sharding, frozen, batch
            ).compile()
            logging.info('compiled the train step for batch shapes %s', signature)
        return compiled[signature]

    # -- Loop --------------------------------------------------------------------------------------
    hooks = [
        periodic_actions.ReportProgress(
            num_train_steps=config.total_steps, writer=writer, every_steps=config.log_every_steps
        )
    ]
    if config.profile.num_steps > 0 and jax.process_index() == 0:
        hooks.append(
            periodic_actions.Profile(
                logdir=workdir, first_profile=config.profile.first_step, num_profile_steps=config.profile.num_steps
            )
        )
    # Compiled once, reused at every image step; replicated so every process can read the grid.
    visualize_fn = jax.jit(task.visualize, out_shardings=sharding.replicated(mesh))
    image_batch = next(iter(input_pipeline.eval_batches(config, task.tokenizer)))
    batch_keys = tuple(task.batch_spec())
    image_batch = {k: np.asarray(image_batch[k][: config.eval.num_grid_images]) for k in batch_keys}
    pending_metrics, last_log, nonfinite_streak = [], (time.time(), start_step), 0
    ids_file = (
        open(os.path.join(workdir, 'batch_ids.txt'), 'a')
        if config.record_batch_ids and jax.process_index() == 0
        else None
    )
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
                summary, nonfinite_streak = summarize(
                    jax.device_get(pending_metrics), nonfinite_streak, config.max_nonfinite_steps
                )
                now = time.time()
                summary['images_per_sec'] = (step - last_log[1]) * config.input.batch_size / (now - last_log[0])
                if flops:
                    summary['device_gflops_per_sec'] = (
                        (step - last_log[1]) * flops / mesh.size / (now - last_log[0]) / 1e9
                    )
                writer.write_scalars(step, summary)
                pending_metrics, last_log = [], (now, step)
            preempted = preemption.reached(step)
            if step % config.image_every_steps == 0 and not preempted:
                _write_images(visualize_fn, config, state, frozen, writer, workdir, image_batch)
            if (
                config.eval_every_steps
                and step % config.eval_every_steps == 0
                and step != config.total_steps
                and not preempted
            ):
                _evaluate(task, config, state, frozen, writer, workdir)
            if step % config.checkpoint_every_steps == 0 or step == config.total_steps or preempted:
                checkpoint.save(manager, step, state=state, data_iterator=train_iter, config=config)
            if preempted:
                logging.warning(
                    'preempted (SIGTERM) at step %d: saved a checkpoint; rerun the same command to resume', step
                )
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
