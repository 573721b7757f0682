"""The only module that talks to orbax: save and restore the train state, the data iterator and
the config together, asynchronously, keeping the newest N checkpoints."""
import logging
import os
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp


def create_manager(directory: str, *, max_to_keep: int) -> ocp.CheckpointManager:
    """An async CheckpointManager with items state / data / config under `directory`."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                 item_names=('state', 'data', 'config'))


def save(manager: ocp.CheckpointManager, step: int, *, state: Any, data_iterator: Any,
         config: ml_collections.ConfigDict) -> None:
    """Starts an async save of everything needed to resume at `step`."""
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        config=ocp.args.JsonSave(config.to_dict())))


def restore_latest(manager: ocp.CheckpointManager, *, abstract_state: Any,
                   data_iterator: Any) -> tuple[int, Any] | None:
    """Restores the newest checkpoint into arrays shaped and sharded like `abstract_state`.

    `data_iterator` is restored in place, before it yields anything. Returns (step, state), or
    None when the directory holds no checkpoint.
    """
    step = manager.latest_step()
    if step is None:
        return None
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iterator)))
    logging.info('Restored checkpoint at step %d from %s', step, manager.directory)
    return step, restored['state']


def wait(manager: ocp.CheckpointManager) -> None:
    """Blocks until every pending async save has committed."""
    manager.wait_until_finished()


def load_trained(workdir: str) -> tuple[ml_collections.ConfigDict, dict]:
    """(config, state as a dict of arrays on one device) of the newest checkpoint of a run.

    For using a trained stage frozen inside another (Stage A inside Stage B, the effnet inside
    Stage C, all of them in sampling), on any number of devices: the arrays are restored from the
    checkpoint's own shapes onto this process's first device, whatever topology saved them.
    """
    directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    manager = ocp.CheckpointManager(directory, item_names=('state', 'data', 'config'),
                                    item_handlers={'state': ocp.StandardCheckpointHandler(),
                                                   'config': ocp.JsonCheckpointHandler()})
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f'no checkpoint under {directory}: train that stage first (its --workdir)')
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          manager.item_metadata(step)['state'])
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                             config=ocp.args.JsonRestore()))
    logging.info('Loaded step %d of %s', step, workdir)
    return ml_collections.ConfigDict(restored['config']), restored['state']
