"""Input pipeline throughput (images/s) with 0 and 2 grain workers, against what the train step
consumes, as one JSON object on the last line.

  python bench/data.py --config=configs/shapes.py:stage=b [--batches=50] [--step_images_per_s=N]

The pipeline is the training one (`input_pipeline.create_train_iterator`: global shuffle, decode,
resize, crop, flip, tokenize, batch) over the config's prepared dataset. `--step_images_per_s` is
`images_per_s` of `bench/train_step.py` for the same config (else only the pipeline is timed);
`headroom_*` = pipeline / step must stay above 1, or the input is the bottleneck. Each worker count
is timed over `--batches` batches after the first two (worker start-up and the first decode).
"""

import time

from absl import app, flags
from ml_collections import config_flags

import common
from wurst_jax.data import input_pipeline
from wurst_jax.tokenizer import create_tokenizer

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/shapes.py:stage=b', 'Config whose input to time.')
_BATCHES = flags.DEFINE_integer('batches', 50, 'Timed batches per worker count.')
_WORKERS = flags.DEFINE_multi_integer('workers', [0, 2], 'Worker counts to time.')
_STEP_RATE = flags.DEFINE_float('step_images_per_s', 0.0, 'What the train step consumes (train_step.py).')


def images_per_second(config, tokenizer, workers: int, batches: int) -> float:
    """Training batches per second of the config's pipeline with `workers` grain processes, in images."""
    input_config = config.input.copy_and_resolve_references()
    input_config.num_workers = workers
    iterator = input_pipeline.create_train_iterator(
        input_config, seed=config.seed, process_index=0, process_count=1, tokenizer=tokenizer
    )
    for _ in range(2):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    elapsed = time.perf_counter() - start
    del iterator
    return batches * config.input.batch_size / elapsed


def main(_):
    config = _CONFIG.value
    text = config.get('text')
    tokenizer = create_tokenizer(text.tokenizer, text.max_length, text.get('vocabulary', ())) if text else None
    result = dict(
        dataset=config.input.dataset,
        image_size=config.input.image_size,
        batch_size=config.input.batch_size,
        batches=_BATCHES.value,
    )
    for workers in _WORKERS.value:
        rate = images_per_second(config, tokenizer, workers, _BATCHES.value)
        result[f'images_per_s_{workers}_workers'] = round(rate, 1)
        if _STEP_RATE.value:
            result[f'headroom_{workers}_workers'] = round(rate / _STEP_RATE.value, 2)
    if _STEP_RATE.value:
        result['step_images_per_s'] = _STEP_RATE.value
    result.update(common.machine())
    common.print_result(result)


if __name__ == '__main__':
    app.run(main)
