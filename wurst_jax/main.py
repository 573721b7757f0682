"""Entry point: `python -m wurst_jax.main --config=configs/NAME.py[:ARGS] --workdir=DIR [--config.F=V]`.

Rerunning the same command on the same workdir resumes from its latest checkpoint.
"""
import logging

from absl import app, flags
from ml_collections import config_flags

from wurst_jax import config_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, TensorBoard events and images.')
flags.mark_flags_as_required(['config', 'workdir'])


class _QuietLibraries(logging.Filter):
    """Drops INFO chatter of orbax and tfds (a dozen lines per checkpoint); warnings still pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        noisy = any(part in record.pathname for part in ('/orbax/', '/tensorflow_datasets/'))
        return record.levelno >= logging.WARNING or not noisy


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    config = _CONFIG.value
    try:
        config_lib.validate(config)  # before jax touches a device or compiles anything
    except config_lib.ConfigError as e:
        raise SystemExit(f'Invalid config: {e}') from None
    for handler in logging.getLogger().handlers:
        handler.addFilter(_QuietLibraries())
    # Imported late so a config error costs no TensorFlow/JAX start-up time.
    import jax
    from wurst_jax import train
    # TF is only used by clu's TensorBoard writer; keep it off any accelerator.
    import tensorflow as tf
    tf.config.set_visible_devices([], 'GPU')
    logging.info('JAX process %d of %d, %d local devices', jax.process_index(), jax.process_count(),
                 jax.local_device_count())
    train.train_and_evaluate(config, _WORKDIR.value)


if __name__ == '__main__':
    app.run(main)
