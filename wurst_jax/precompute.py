"""Stage C's frozen inputs, computed once: effnet (or Stage A) latents and, for a frozen text encoder,
text states (with their padding mask for a T5 encoder, as PixArt-α's `tools/extract_features.py`).

  python -m wurst_jax.precompute --config=configs/stage_c.py:clip=...,effnet=... [--out=DIR]
      [--splits=train,test] [--batch_size=64] [--dtype=float32|bfloat16]

Runs the config's semantic compressor (and a frozen text encoder) over every image of each split, centre-
cropped as for evaluation, and writes the ArrayRecord files and metadata.json that
`wurst_jax/data/precomputed.py` describes; each JAX process writes every N-th example to its own file.
DIR defaults to `stage_c_precomputed` next to the dataset's own ArrayRecord files. Train on it with
`--config.input.precomputed=DIR`: the step then reads latents and text states instead of running
the encoders (a trained text encoder still tokenizes the caption).
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from array_record.python import array_record_module
from flax import serialization
from ml_collections import config_flags

from wurst_jax import config_lib, sharding
from wurst_jax.data import input_pipeline, precomputed

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A Stage C config.', lock_config=True)
_OUT = flags.DEFINE_string('out', None, 'Output folder (default: next to the dataset).')
_SPLITS = flags.DEFINE_list('splits', None, 'Splits to write (default: the train and eval splits).')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Images per encoder batch (rounded up to the device count).')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Storage dtype of latents and states.')
flags.mark_flags_as_required(['config'])


def default_out(config: ml_collections.ConfigDict) -> str:
    if config.input.dataset in input_pipeline.BUILTIN_DATASETS:
        data_dir = input_pipeline.builtin_builder(config.input).data_dir
    else:
        data_dir = input_pipeline.prepared_builder(config.input.dataset, config.input.data_dir).data_dir
    return os.path.join(data_dir, 'stage_c_precomputed')


def encode_fn(task):
    """jitted images [-1, 1], tokens, mask -> (latents, text states (MaskedStates of T5) or None)."""
    frozen = task.frozen_params()
    text_frozen = not task.text.trainable

    @jax.jit
    def encode(images, tokens, mask):
        latents = task.latents(frozen, images)
        states = task.text.encode(frozen['text'], tokens, mask) if text_frozen else None
        return latents, states

    return encode


def write_split(task, config: ml_collections.ConfigDict, split: str, out: str, batch_size: int, dtype: np.dtype) -> int:
    """Encodes this process's share of `split` into its record file; returns the number written."""
    index, count = jax.process_index(), jax.process_count()
    mesh = sharding.create_mesh(ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1}), jax.local_devices())
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
    batch_size = -(-batch_size // mesh.size) * mesh.size
    encode = encode_fn(task)
    path = os.path.join(out, f'{split}-{index:05d}-of-{count:05d}.array_record')
    tmp = path + '.tmp'
    writer = array_record_module.ArrayRecordWriter(tmp, 'group_size:1')
    written = 0
    batches = input_pipeline.create_eval_iterator(
        config.input,
        split=split,
        batch_size=batch_size,
        tokenizer=task.tokenizer,
        process_index=index,
        process_count=count,
    )
    for batch in batches:
        n = len(batch['id'])
        pad = lambda x: np.concatenate([x, np.repeat(x[-1:], batch_size - n, axis=0)]) if n < batch_size else x
        put = lambda x: jax.device_put(pad(np.asarray(x)), batch_sharding)
        latents, states = jax.device_get(encode(put(batch['image']), put(batch['tokens']), put(batch['token_mask'])))
        for i in range(n):
            record = {
                'id': int(batch['id'][i]),
                'caption': str(batch['caption'][i]),
                'latents': np.asarray(latents[i]).astype(dtype),
            }
            if states is not None:
                text, mask = states if task.text.masked else (states, None)
                record.update(precomputed.text_fields(text[i], None if mask is None else mask[i], dtype))
            writer.write(serialization.msgpack_serialize(record))
        written += n
    writer.close()
    os.replace(tmp, path)  # a file under the final name is always complete
    return written


def check_config(config: ml_collections.ConfigDict) -> None:
    """ConfigError unless `config` is a Stage C config that reads images (not records already)."""
    from wurst_jax import tasks  # JAX and the networks load only after the flags are checked

    tasks.validate(config)
    if config.model_family != 'stage_c':
        raise config_lib.ConfigError(
            'model_family', config.model_family, "'stage_c': only Stage C has frozen encoders to precompute"
        )
    if config.input.precomputed:
        raise config_lib.ConfigError(
            'input.precomputed',
            config.input.precomputed,
            "'' when precomputing: the images are read from input.dataset",
        )


def precompute(
    config: ml_collections.ConfigDict, out: str, splits: list[str], batch_size: int, dtype: str = 'float32'
) -> dict:
    """Writes the records of `splits` and metadata.json into `out`; returns the metadata."""
    from wurst_jax import tasks  # as in check_config

    check_config(config)
    task = tasks.create(config)
    os.makedirs(out, exist_ok=True)
    np_dtype = {'float32': np.float32, 'bfloat16': jnp.bfloat16}[dtype]
    counts = {}
    for split in splits:
        counts[split] = write_split(task, config, split, out, batch_size, np_dtype)
        logging.info('wrote %d %s records to %s', counts[split], split, out)
    metadata = {
        'config': precomputed.fingerprint(config),
        'latent_shape': list(task.latent_shape()),
        'text_states': not task.text.trainable,
        'dtype': dtype,
        'process_count': jax.process_count(),
        'counts_process_0': counts,
    }
    if jax.process_index() == 0:
        if not task.text.trainable:
            empty = task.text.empty_states(task.frozen_params()['text'])
            states, mask = empty if task.text.masked else (empty, None)
            precomputed.write_empty_caption(out, states[0], None if mask is None else mask[0], np_dtype)
        # Last: a folder with metadata.json is complete.
        with open(os.path.join(out, precomputed.METADATA), 'w') as f:
            json.dump(metadata, f, indent=1)
    return metadata


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    config = _CONFIG.value
    try:
        check_config(config)
    except config_lib.ConfigError as e:
        raise SystemExit(f'Invalid config: {e}') from None
    out = _OUT.value or default_out(config)
    splits = _SPLITS.value or [config.input.train_split, config.input.eval_split]
    metadata = precompute(config, out, splits, _BATCH.value, _DTYPE.value)
    print(f'wrote {metadata["counts_process_0"]} records to {out}; train with --config.input.precomputed={out}')


if __name__ == '__main__':
    app.run(main, flags_parser=config_lib.parse_flags)
