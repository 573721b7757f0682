"""Key tables of the transformers CLIP towers: clip_text (CLIPTextModelWithProjection, or CLIPTextModel
folders) and clip_vision (CLIPVisionModelWithProjection).

Flax names are the transformers module names, so a key is the Flax path joined with dots, with
`layers_i` -> `layers.i` and the leaf renamed. Files hold the tower under `text_model.` /
`vision_model.` and the projection at the top; transformers >= 5 saves a bare CLIPTextModel without
the `text_model.` prefix, which `_text_state` adds back. We always write the prefix (what the hub
checkpoints hold and every transformers version loads).
"""

import jax.numpy as jnp

from wurst_jax.convert.core import Component, register
from wurst_jax.models.clip import CLIPTextModel, CLIPVisionModel

_LEAVES = {'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight'}
_BUFFERS = ('position_ids',)  # non-persistent in transformers, but present in some old files


def _key(tower: str, projection: str, path: tuple[str, ...]) -> str:
    _, *names, leaf = path
    parts = [name.replace('layers_', 'layers.') for name in names] + [_LEAVES.get(leaf, leaf)]
    return '.'.join(parts if names[:1] == [projection] else [tower] + parts)


def _drop_buffers(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.endswith(_BUFFERS)}


def _text_state(state: dict) -> dict:
    state = _drop_buffers(state)
    return {k if k.startswith(('text_model.', 'text_projection.')) else f'text_model.{k}': v for k, v in state.items()}


register(
    'clip_text',
    Component(
        class_name='CLIPTextModelWithProjection',
        accepts=('CLIPTextModel',),
        library='transformers',
        from_config=CLIPTextModel.from_hf_config,
        to_config=CLIPTextModel.hf_config,
        example_inputs=lambda m: (jnp.zeros((1, m.max_position_embeddings), jnp.int32),),
        torch_key=lambda m, path: _key('text_model', 'text_projection', path),
        prepare_state=_text_state,
    ),
)

register(
    'clip_vision',
    Component(
        class_name='CLIPVisionModelWithProjection',
        library='transformers',
        from_config=CLIPVisionModel.from_hf_config,
        to_config=CLIPVisionModel.hf_config,
        example_inputs=lambda m: (jnp.zeros((1, m.image_size, m.image_size, m.num_channels)),),
        torch_key=lambda m, path: _key('vision_model', 'visual_projection', path),
        prepare_state=_drop_buffers,
    ),
)
