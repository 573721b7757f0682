"""The records `python -m wurst_jax.precompute` writes for Stage C, and how training reads them.

A folder holds `{split}-{process:05d}-of-{N:05d}.array_record` files of msgpack dicts (id, caption,
latents [h, w, c] scaled as config.latent_scaling says, and text_states [L, D] for a frozen text
encoder, with text_mask [L] (1 for a real token) for a T5 one), metadata.json with the config fields they
depend on and, for a frozen encoder, empty_caption.msgpack: the empty caption's states (and mask), which
caption dropout and guidance put in place of a caption's, so that training never runs the encoder.
"""

import json
import os

import ml_collections
import numpy as np
from flax import serialization

from wurst_jax.config_lib import ConfigError

METADATA = 'metadata.json'
EMPTY_CAPTION = 'empty_caption.msgpack'
# The config fields the records depend on: training checks them against its own config.
FINGERPRINT_FIELDS = (
    'effnet.source',
    'effnet.image_size',
    'latent_scaling',
    'text.encoder',
    'text.tokenizer',
    'text.max_length',
    'text.hidden_state',
    'input.dataset',
    'input.image_size',
    'input.resize',
)


def fingerprint(config: ml_collections.ConfigDict) -> dict[str, object]:
    out = {}
    for field in FINGERPRINT_FIELDS:
        value = config
        for part in field.split('.'):
            value = value[part]
        out[field] = value
    return out


def shard_paths(folder: str, split: str) -> list[str]:
    """This split's record files in `folder`, sorted; an error that says how to make them if none."""
    paths = (
        sorted(
            os.path.join(folder, f)
            for f in os.listdir(folder)
            if f.startswith(f'{split}-') and f.endswith('.array_record')
        )
        if os.path.isdir(folder)
        else []
    )
    if not paths:
        raise FileNotFoundError(
            f'no precomputed {split!r} records in {folder}: run '
            f'`python -m wurst_jax.precompute --config=... --out={folder}` first'
        )
    return paths


def read_metadata(folder: str) -> dict:
    path = os.path.join(folder, METADATA)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f'{path} is missing: {folder} was not written by `python -m wurst_jax.precompute` '
            'or the run was interrupted; run it again'
        )
    with open(path) as f:
        return json.load(f)


def check_matches(config: ml_collections.ConfigDict) -> None:
    """ConfigError naming the first field whose value differs from the one the records were made with."""
    made_with = read_metadata(config.input.precomputed)['config']
    for field, value in fingerprint(config).items():
        if made_with.get(field) != value:
            raise ConfigError(
                field,
                value,
                f'{made_with.get(field)!r}, the value input.precomputed='
                f'{config.input.precomputed} was made with (or precompute again with this config)',
            )


def text_fields(states: np.ndarray, mask: np.ndarray | None, dtype: np.dtype) -> dict[str, np.ndarray]:
    """One caption's stored text: states [L, D] in `dtype`, and T5's mask [L] as uint8."""
    fields = {'text_states': np.asarray(states).astype(dtype)}
    if mask is not None:
        fields['text_mask'] = np.asarray(mask).astype(np.uint8)
    return fields


def write_empty_caption(folder: str, states: np.ndarray, mask: np.ndarray | None, dtype: np.dtype) -> None:
    """The empty caption's text states [L, D] (and T5's mask [L]) as the records store theirs."""
    with open(os.path.join(folder, EMPTY_CAPTION), 'wb') as f:
        f.write(serialization.msgpack_serialize(text_fields(states, mask, dtype)))


def read_empty_caption(folder: str) -> dict[str, np.ndarray]:
    """{'text_states': float32 [L, D], and 'text_mask': int32 [L] of a T5 encoder} of the empty caption."""
    path = os.path.join(folder, EMPTY_CAPTION)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is missing: the records were written without the empty caption's text states, which "
            'training on them needs for caption dropout; run `python -m wurst_jax.precompute` again'
        )
    with open(path, 'rb') as f:
        return _as_arrays(serialization.msgpack_restore(f.read()))


def _as_arrays(example: dict) -> dict:
    """Stored features as float32 arrays, a T5 mask as int32."""
    for key in ('latents', 'text_states'):
        if key in example:
            example[key] = np.asarray(example[key], np.float32)
    if 'text_mask' in example:
        example['text_mask'] = np.asarray(example['text_mask'], np.int32)
    return example


def decode_record(record: bytes) -> dict:
    """A stored record as a dict of numpy arrays (float32 features) and the caption str."""
    example = _as_arrays(serialization.msgpack_restore(record))
    example['caption'] = str(example['caption'])
    return example
