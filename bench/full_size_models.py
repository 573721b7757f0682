"""Writes config-only model folders of the full-size frozen networks, for `wurst_jax.plan`.

  python bench/full_size_models.py /tmp/v2_models

makes clip_bigg (CLIP ViT-bigG/14 text, Würstchen v2 Stage C), clip_h (CLIP ViT-H/14 text, v2
Stage B), effnet (EfficientNetV2-S encoder), vqgan (the f4 Paella VQGAN), t5_xxl (T5-v1.1-XXL's
encoder, PixArt-α's text encoder), prior (the released v2 WuerstchenPrior, what fine-tuning and LoRA
start from), Stable Cascade's stage_c and stage_c_lite (StableCascadeUNet priors), clip_bigg_projection
(bigG with its text projection, which they read pooled) and effnet_sc (its encoder, mapper BatchNorm
without affine), and images (an empty image folder), each holding only config.json, and prints the
config arguments that name them. No weights are written or needed.
"""

import os
import sys

from wurst_jax.convert import core
from wurst_jax.models.clip import CLIPTextModel
from wurst_jax.models.effnet import EfficientNetEncoder
from wurst_jax.models.stable_cascade import RELEASED, StableCascadeUNet
from wurst_jax.models.stage_a import VQGAN
from wurst_jax.models.stage_c import WuerstchenPrior
from wurst_jax.models.t5 import T5Encoder


def _clip(width: int, layers: int, heads: int, projection_dim: int | None = None) -> CLIPTextModel:
    """An OpenCLIP text tower as transformers configures it (4x MLP, GELU; no projection by default)."""
    return CLIPTextModel(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        hidden_act='gelu',
        projection_dim=projection_dim,
    )


MODELS = {
    'clip_bigg': (_clip(1280, 32, 20), 'clip_text'),
    'clip_h': (_clip(1024, 24, 16), 'clip_text'),
    'effnet': (EfficientNetEncoder(c_latent=16), 'effnet'),
    'vqgan': (VQGAN(), 'vqgan'),
    't5_xxl': (T5Encoder(), 't5_encoder'),  # the defaults are T5-v1.1-XXL's
    'prior': (WuerstchenPrior(), 'prior'),  # the defaults are the released v2 prior's
    'stage_c': (StableCascadeUNet(**RELEASED['stage_c']), 'stable_cascade_unet'),
    'stage_c_lite': (StableCascadeUNet(**RELEASED['stage_c_lite']), 'stable_cascade_unet'),
    'clip_bigg_projection': (_clip(1280, 32, 20, projection_dim=1280), 'clip_text'),
    'effnet_sc': (EfficientNetEncoder(c_latent=16, mapper_affine=False), 'effnet'),
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
    for size, prior in (('3b', 'stage_c'), ('1b', 'stage_c_lite')):
        print(
            f'configs/stable_cascade_c.py:size={size},prior={out}/{prior},clip={out}/clip_bigg_projection,'
            f'effnet={out}/effnet_sc,images={out}/images'
        )


if __name__ == '__main__':
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
