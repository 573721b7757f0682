"""Writes config-only model folders of the full-size frozen networks, for `wurst_jax.plan`.

  python bench/full_size_models.py /tmp/v2_models

makes clip_bigg (CLIP ViT-bigG/14 text, Würstchen v2 Stage C), clip_h (CLIP ViT-H/14 text, v2
Stage B), effnet (EfficientNetV2-S encoder) and vqgan (the f4 Paella VQGAN), each holding only
config.json, and prints the config arguments that name them. No weights are written or needed.
"""

import os
import sys

from wurst_jax.convert import core
from wurst_jax.models.clip import CLIPTextModel
from wurst_jax.models.effnet import EfficientNetEncoder
from wurst_jax.models.stage_a import VQGAN

MODELS = {
    'clip_bigg': (
        CLIPTextModel(
            vocab_size=49408,
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=20,
            hidden_act='gelu',
            projection_dim=None,
        ),
        'clip_text',
    ),
    'clip_h': (
        CLIPTextModel(
            vocab_size=49408,
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            hidden_act='gelu',
            projection_dim=None,
        ),
        'clip_text',
    ),
    'effnet': (EfficientNetEncoder(c_latent=16), 'effnet'),
    'vqgan': (VQGAN(), 'vqgan'),
}


def main(out: str) -> None:
    for name, (module, component) in MODELS.items():
        core.write_config(module, os.path.join(out, name), component)
    print(f'configs/stage_c.py:clip={out}/clip_bigg,effnet={out}/effnet')
    print(f'configs/stage_b.py:vqgan={out}/vqgan,effnet={out}/effnet,clip={out}/clip_h')


if __name__ == '__main__':
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
