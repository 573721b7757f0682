"""Entry point: `python -m wurst_jax.main --config=configs/NAME.py[:ARGS] --workdir=DIR [--config.F=V]`.

Rerunning the same command on the same workdir resumes from its latest checkpoint; SIGTERM saves
one and exits 0. On several hosts add `--multihost` (SLURM, TPU pods and other clusters JAX detects)
or `--coordinator_address=HOST:PORT --num_processes=N --process_id=I`; every process runs the
same command. launch/README.md has recipes.
"""

import logging

from absl import app, flags
from ml_collections import config_flags

from wurst_jax import config_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, TensorBoard events and images.')
_MULTIHOST = flags.DEFINE_bool(
    'multihost',
    False,
    'Call jax.distributed.initialize, detecting the cluster (SLURM, TPU pod, Open MPI, ...) from the environment.',
)
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'HOST:PORT of process 0 (implies --multihost).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Process count, with --coordinator_address.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0..N-1, with --coordinator_address.')
_INIT_TIMEOUT = flags.DEFINE_integer('distributed_timeout', 300, 'Seconds to wait for all processes to join.')
_HEARTBEAT = flags.DEFINE_integer(
    'heartbeat_timeout',
    100,
    'Seconds after which a silent (dead) process makes the others exit non-zero instead of hanging.',
)
flags.mark_flags_as_required(['config', 'workdir'])


def distributed_args() -> dict | None:
    """jax.distributed.initialize keyword arguments from the flags, or None for a single process."""
    explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
        raise app.UsageError('--coordinator_address, --num_processes and --process_id go together')
    if not (_MULTIHOST.value or _COORDINATOR.value):
        return None
    args = dict(initialization_timeout=_INIT_TIMEOUT.value, heartbeat_timeout_seconds=_HEARTBEAT.value)
    if _COORDINATOR.value:
        args.update(
            coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value
        )
    return args


class _QuietLibraries(logging.Filter):
    """Drops INFO chatter of orbax and tfds (a dozen lines per checkpoint); warnings still pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        noisy = any(part in record.pathname for part in ('/orbax/', '/tensorflow_datasets/'))
        return record.levelno >= logging.WARNING or not noisy


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    config = _CONFIG.value
    from wurst_jax import tasks  # loads JAX and the families: after the flags parse

    try:
        tasks.validate(config)  # before jax touches a device or compiles anything
    except config_lib.ConfigError as e:
        raise SystemExit(f'Invalid config: {e}') from None
    for handler in logging.getLogger().handlers:
        handler.addFilter(_QuietLibraries())
    # Imported late so a config error costs no TensorFlow/JAX start-up time.
    import jax

    dist = distributed_args()
    if dist is not None:
        jax.distributed.initialize(**dist)  # before anything touches a device
        # The first cross-process collective sets up the CPU collectives, whose set-up waits only 30 s
        # for the peers: do it now, while every process is at the same point, not after uneven work.
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices('wurst_jax: all processes started')
    # TF is only used by clu's TensorBoard writer; keep it off any accelerator.
    import tensorflow as tf

    from wurst_jax import train

    tf.config.set_visible_devices([], 'GPU')
    logging.info(
        'JAX process %d of %d, %d local devices', jax.process_index(), jax.process_count(), jax.local_device_count()
    )
    train.train_and_evaluate(config, _WORKDIR.value)


if __name__ == '__main__':
    app.run(main, flags_parser=config_lib.parse_flags)
