"""Key table of the T5 encoder (`models/t5.py`) <-> transformers T5EncoderModel folders.

Flax names are the transformers module names: a key is the Flax path joined with dots, with
`block_i` -> `block.i`, `layer_i` -> `layer.i` and the leaf renamed. The relative-position table that
transformers keeps in the first block's attention sits beside the blocks in Flax
(`encoder/relative_attention_bias`).

Folders of a T5EncoderModel, T5Model or T5ForConditionalGeneration are read, single-file or sharded
(`model.safetensors.index.json`); only the encoder's tensors are read (`shared.*`, `encoder.*`), never a
decoder's or an LM head's. The token table is `shared.weight`; files written by older transformers also
hold its tied copy `encoder.embed_tokens.weight`, which stands in for `shared.weight` when that is absent
and is otherwise dropped. We write `shared.weight` only, what transformers saves and every version loads.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np

from wurst_jax.convert.core import Component, register
from wurst_jax.models.t5 import T5Encoder

_LEAVES = {'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight'}
_TABLE = ('encoder', 'relative_attention_bias')
_TABLE_KEY = 'encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight'
_EMBED_COPY = 'encoder.embed_tokens.weight'


def _key(m: T5Encoder, path: tuple[str, ...]) -> str:
    _, *names, leaf = path
    if (*names, leaf) == _TABLE:
        return _TABLE_KEY
    parts = [re.sub(r'^(block|layer)_(\d+)$', r'\1.\2', name) for name in names]
    return '.'.join(parts + [_LEAVES.get(leaf, leaf)])


def _encoder_key(key: str) -> bool:
    return key.startswith(('shared.', 'encoder.'))


def _encoder_state(state: dict) -> dict:
    state = {k: v for k, v in state.items() if _encoder_key(k)}
    copy = state.pop(_EMBED_COPY, None)
    if 'shared.weight' not in state and copy is not None:
        state['shared.weight'] = copy
    return state


def _stack(m: T5Encoder, variables: dict) -> dict:
    """Unscanned encoder/block_0..block_{n-1} -> one encoder/block with a leading layer axis."""
    encoder = dict(variables['params']['encoder'])
    blocks = [encoder.pop(f'block_{i}') for i in range(m.num_layers)]
    encoder['block'] = jax.tree.map(lambda *xs: np.stack(xs), *blocks)
    return {**variables, 'params': {**variables['params'], 'encoder': encoder}}


def _unstack(m: T5Encoder, variables: dict) -> dict:
    encoder = dict(variables['params']['encoder'])
    blocks = encoder.pop('block')
    for i in range(m.num_layers):
        encoder[f'block_{i}'] = jax.tree.map(lambda x: x[i], blocks)
    return {**variables, 'params': {**variables['params'], 'encoder': encoder}}


register(
    't5_encoder',
    Component(
        class_name='T5EncoderModel',
        accepts=('T5ForConditionalGeneration', 'T5Model'),
        library='transformers',
        from_config=T5Encoder.from_hf_config,
        to_config=T5Encoder.hf_config,
        example_inputs=lambda m: (jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32)),
        torch_key=_key,
        prepare_state=_encoder_state,
        keep_key=_encoder_key,
        stack=_stack,
        unstack=_unstack,
    ),
)
