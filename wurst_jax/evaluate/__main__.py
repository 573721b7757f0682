"""python -m wurst_jax.evaluate --config=configs/eval.py --config.workdir=RUN --config.prompts=FILE [...]

See configs/eval.py for the fields and wurst_jax/evaluate/job.py for what is written.
"""
import json

import jax
from absl import app
from ml_collections import config_flags

from wurst_jax.evaluate import job

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/eval.py', 'Evaluation config.')


def main(argv):
    del argv
    config = _CONFIG.value
    if config.multihost:
        jax.distributed.initialize()
    for result in job.run(config):
        if jax.process_index() == 0:
            print(json.dumps({k: result[k] for k in ('step', 'num_images', 'metrics', 'skipped')}))


if __name__ == '__main__':
    app.run(main)
