"""The only module that talks to orbax: save and restore the train state, the data iterator and
the config together, asynchronously, keeping the newest N checkpoints."""

import contextlib
import json
import logging
import os
import shutil
import time
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from wurst_jax import defaults

COMPLETE_MARKER = 'training_complete.json'


def mark_complete(workdir: str, step: int) -> None:
    """Tells evaluation jobs that follow the run that no further checkpoint will come."""
    with open(os.path.join(workdir, COMPLETE_MARKER), 'w') as f:
        json.dump({'step': step}, f)


def clear_complete(workdir: str) -> None:
    """A run that (re)starts training is not complete, e.g. one resumed with a larger total_steps."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(workdir, COMPLETE_MARKER))


def is_complete(workdir: str) -> bool:
    return os.path.isfile(os.path.join(workdir, COMPLETE_MARKER))


def all_steps(workdir: str) -> list[int]:
    """Committed checkpoint steps of a run, oldest first (none if it has not saved one yet)."""
    directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    if not os.path.isdir(directory):
        return []
    return sorted(ocp.CheckpointManager(directory).all_steps())


def create_manager(directory: str, *, max_to_keep: int) -> ocp.CheckpointManager:
    """An async CheckpointManager with items state / data / config under `directory`."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=('state', 'data', 'config'))


def save(
    manager: ocp.CheckpointManager, step: int, *, state: Any, data_iterator: Any, config: ml_collections.ConfigDict
) -> None:
    """Starts an async save of everything needed to resume at `step`."""
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            config=ocp.args.JsonSave(config.to_dict()),
        ),
    )


def restore_latest(
    manager: ocp.CheckpointManager, *, abstract_state: Any, data_iterator: Any
) -> tuple[int, Any] | None:
    """Restores the newest checkpoint that reads back into arrays shaped and sharded like `abstract_state`.

    `data_iterator` is restored in place, before it yields anything. A newer checkpoint that fails to
    restore (truncated or corrupt files) is named in a warning and, once an older one has restored,
    moved to a sibling `corrupt_checkpoints/` folder so the run can save that step again. Returns
    (step, state), or None when the directory holds no checkpoint; raises, moving nothing, if none
    restores.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    failed = []
    for step in steps:
        try:
            state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))[
                'state'
            ]
            _restore_data_iterator(os.path.join(str(manager.directory), str(step), 'data'), data_iterator)
        except Exception as e:  # orbax, tensorstore and json raise many types for damaged files
            logging.warning(
                'checkpoint %s/%d cannot be restored (%s: %s)', manager.directory, step, type(e).__name__, str(e)[:500]
            )
            failed.append((step, e))
            continue
        for bad, _ in failed:
            _set_aside(manager, bad)
        logging.info('Restored checkpoint at step %d from %s', step, manager.directory)
        return step, state
    if failed:
        raise RuntimeError(
            f'none of the checkpoints {steps} under {manager.directory} could be restored; the '
            f'newest failed with {failed[0][1]!r}'
        ) from failed[0][1]
    return None


def _restore_data_iterator(directory: str, data_iterator: Any) -> None:
    """Sets the iterator to the saved position. Saved by another number of processes, any process's
    file serves: every process's iterator counts batches, which is the global step in each
    (input_pipeline shards the global stream before batching), so the global order carries over."""
    own = os.path.join(directory, f'process_{jax.process_index()}-of-{jax.process_count()}.json')
    if not os.path.exists(own):
        saved = sorted(f for f in os.listdir(directory) if f.startswith('process_0-of-'))
        if not saved:
            raise FileNotFoundError(f'no data iterator state in {directory}')
        logging.warning(
            'the data position was saved by %s; carrying it over to %d processes',
            saved[0].removeprefix('process_0-of-').removesuffix('.json') + ' processes',
            jax.process_count(),
        )
        own = os.path.join(directory, saved[0])
    with open(own) as f:
        data_iterator.set_state(json.loads(f.read()))


def _set_aside(manager: ocp.CheckpointManager, step: int) -> None:
    """Moves a checkpoint that does not restore out of the manager's directory (process 0 moves it)."""
    src = os.path.join(str(manager.directory), str(step))
    dst = os.path.join(os.path.dirname(str(manager.directory)), 'corrupt_checkpoints', str(step))
    logging.warning('moved the checkpoint %s that cannot be restored to %s; resuming from an older one', src, dst)
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.move(src, dst if not os.path.exists(dst) else f'{dst}.{int(time.time())}')
    multihost_utils.sync_global_devices(f'set aside checkpoint {step}')
    manager.reload()


def wait(manager: ocp.CheckpointManager) -> None:
    """Blocks until every pending async save has committed."""
    manager.wait_until_finished()


def load_trained(
    workdir: str, step: int | None = None, parts: tuple[str, ...] | None = None
) -> tuple[ml_collections.ConfigDict, dict]:
    """(config brought up to date by `defaults.upgrade`, state as a dict of arrays on one device) of a run's
    checkpoint, the newest by default;
    with `parts` (e.g. ('ema_params', 'model_state')) only those entries of the state are read.

    For using a trained stage frozen inside another (Stage A inside Stage B, the effnet inside
    Stage C, all of them in sampling), on any number of devices: the arrays are restored from the
    checkpoint's own shapes onto this process's first device, whatever topology saved them.
    """
    directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    manager = ocp.CheckpointManager(
        directory,
        item_names=('state', 'data', 'config'),
        item_handlers={'state': ocp.PyTreeCheckpointHandler(), 'config': ocp.JsonCheckpointHandler()},
    )
    steps = manager.all_steps()
    if not steps:
        raise FileNotFoundError(f'no checkpoint under {directory}: train that stage first (its --workdir)')
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise FileNotFoundError(f'no checkpoint of step {step} under {directory}; it has steps {sorted(steps)}')
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    metadata = manager.item_metadata(step)['state']
    if parts is not None:
        metadata = {k: metadata[k] for k in parts}
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), metadata)
    state = ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=parts is not None
    )
    restored = manager.restore(step, args=ocp.args.Composite(state=state, config=ocp.args.JsonRestore()))
    logging.info('Loaded step %d of %s', step, workdir)
    return defaults.upgrade(ml_collections.ConfigDict(restored['config'])), restored['state']


def saved_config(workdir: str) -> ml_collections.ConfigDict | None:
    """The config a run saved with its newest checkpoint, brought up to date (None before the first): cheap,
    no arrays read."""
    directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    if not all_steps(workdir):
        return None
    manager = ocp.CheckpointManager(
        directory, item_names=('config',), item_handlers={'config': ocp.JsonCheckpointHandler()}
    )
    restored = manager.restore(max(manager.all_steps()), args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return defaults.upgrade(ml_collections.ConfigDict(restored['config']))


def load_params(workdir: str, step: int | None = None, ema: bool = False) -> Any:
    """The params (or EMA params) pytree of a run's checkpoint as numpy arrays on the host: for
    tests, evaluation and conversion."""
    name = 'ema_params' if ema else 'params'
    _, state = load_trained(workdir, step, parts=(name,))
    return jax.device_get(state[name])
