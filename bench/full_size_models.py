"""Writes config-only model folders of the full-size frozen networks, for `wurst_jax.plan`.

  python bench/full_size_models.py /tmp/v2_models

makes clip_bigg (CLIP ViT-bigG/14 text, Würstchen v2 Stage C), clip_h (CLIP ViT-H/14 text, v2
Stage B), effnet (EfficientNetV2-S encoder), vqgan (the f4 Paella VQGAN), t5_xxl (T5-v1.1-XXL's
encoder, PixArt-α's text encoder), prior (the released v2 WuerstchenPrior, what fine-tuning and LoRA
start from) and images (an empty image folder), each holding only config.json, and prints the config
arguments that name them. No weights are written or needed.
"""

import os
import sys

from wurst_jax.convert import core
from wurst_jax.models.clip import CLIPTextModel
from wurst_jax.models.effnet import EfficientNetEncoder
from wurst_jax.models.stage_a import VQGAN
from wurst_jax.models.stage_c import WuerstchenPrior
from wurst_jax.models.t5 import T5Encoder


def _clip(width: int, layers: int, heads: int) -> CLIPTextModel:
    """An OpenCLIP text tower as transformers configures it (4x MLP, GELU, no projection)."""
    return CLIPTextModel(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        hidden_act='gelu',
        projection_dim=None,
    )


MODELS = {
    'clip_bigg': (_clip(1280, 32, 20), 'clip_text'),
    'clip_h': (_clip(1024, 24, 16), 'clip_text'),
    'effnet': (EfficientNetEncoder(c_latent=16), 'effnet'),
    'vqgan': (VQGAN(), 'vqgan'),
    't5_xxl': (T5Encoder(), 't5_encoder'),  # the defaults are T5-v1.1-XXL's
    'prior': (WuerstchenPrior(), 'prior'),  # the defaults are the released v2 prior's
}


def main(out: str) -> None:
    for name, (module, component) in MODELS.items():
        core.write_config(module, os.path.join(out, name), component)
    print(f'configs/stage_c.py:clip={out}/clip_bigg,effnet={out}/effnet')
    print(f'configs/stage_b.py:vqgan={out}/vqgan,effnet={out}/effnet,clip={out}/clip_h')
    print(f'configs/pixart_alpha.py:stage=2,t5={out}/t5_xxl,stage_a={out}/vqgan')
    os.makedirs(os.path.join(out, 'images'), exist_ok=True)  # a plan reads no data
    for name in ('finetune', 'lora'):
        print(
            f'configs/wuerstchen_v2_prior_{name}.py:prior={out}/prior,clip={out}/clip_bigg,effnet={out}/effnet,'
            f'images={out}/images'
        )


if __name__ == '__main__':
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
