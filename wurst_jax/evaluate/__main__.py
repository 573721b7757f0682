"""python -m wurst_jax.evaluate --config=configs/eval.py --config.workdir=RUN --config.prompts=FILE [...]

See configs/eval.py for the fields and wurst_jax/evaluate/job.py for what is written.
"""

import json

import jax
from absl import app, flags
from ml_collections import config_flags

from wurst_jax import config_lib
from wurst_jax.evaluate import job

# No default: a default config file is loaded (with the --config.F overrides) as this module is
# imported, where a misspelt field could only be a traceback.
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Evaluation config, e.g. configs/eval.py.')
flags.mark_flags_as_required(['config'])


def main(argv):
    del argv
    config = _CONFIG.value
    if config.multihost:
        jax.distributed.initialize()
    try:
        results = job.run(config)
    except config_lib.ConfigError as e:
        raise SystemExit(f'Invalid config: {e}') from None
    for result in results:
        if jax.process_index() == 0:
            print(json.dumps({k: result[k] for k in ('step', 'num_images', 'metrics', 'skipped')}))


if __name__ == '__main__':
    app.run(main, flags_parser=config_lib.parse_flags)
