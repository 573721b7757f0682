"""Würstchen's semantic compressor: EfficientNetV2-S (v2, Stable Cascade) or -L (v1) features + a 1x1
conv/BatchNorm mapper
(dome272/Wuerstchen `modules.py` `EfficientNetEncoder`; Stability-AI/StableCascade `modules/effnet.py`).

`EfficientNetEncoder` maps RGB images [B, H, W, 3] to the Stage-C latents [B, H/32, W/32, c_latent]:

    backbone = torchvision `efficientnet_v2_s().features` (stem conv, FusedMBConv/MBConv stages, 1x1 head conv)
    mapper   = Conv1x1(last_channels -> c_latent, no bias) -> BatchNorm(c_latent)

Conventions (all as torchvision, so converted weights give the torch numbers):
  * NHWC. Every conv pads (k - 1) // 2 on every side, also the stride-2 ones (torch's symmetric padding;
    Flax 'SAME' would pad (0, 1) on even inputs and shift the grid by one pixel).
  * BatchNorm eps 1e-3 (backbone; torchvision's efficientnet_v2 norm layer) and 1e-5 (mapper, a plain
    BatchNorm2d), torch's momentum 0.1 and running statistics (`layers.BatchNorm`). `train=False` uses them.
  * SiLU everywhere; squeeze-excitation (MBConv only) = mean over H, W -> 1x1 conv to max(1, block_in // 4)
    -> SiLU -> 1x1 conv -> sigmoid -> scale. Expanded widths are torchvision's `_make_divisible(c * ratio, 8)`.
  * Stochastic depth (torchvision "row" mode: drop whole residual branches per sample, rescale by
    1 / survival) with rate `stochastic_depth_prob * block_index / total_blocks`, only for residual blocks and
    only with `train=True`, which then needs a 'dropout' rng and `mutable=['batch_stats']` (BN uses batch
    statistics). The encoder is used frozen (`train=False`) in all Würstchen / Stable Cascade training.
  * `normalize_input=True` (default): images are RGB in [0, 1] and the ImageNet mean/std normalisation is
    applied inside (the torch checkpoints expect normalised input, done outside the torch module). Batches of the
    input pipeline are in [-1, 1]: pass `(x + 1) / 2`. With False the module is exactly the torch forward.
  * `mapper_affine`: the mapper BN has scale/bias in Würstchen v2 (diffusers EfficientNetEncoder), none in
    Stable Cascade (`BatchNorm2d(16, affine=False)`).
  * `output_scaling='v2'` returns `(x + 1) / 42`, the space Würstchen v2's Stage C diffuses in; 'none' returns
    the raw BN output (Stable Cascade).

Flax names mirror the torch indices (`backbone_4_2/block_1/norm` <-> `backbone.4.2.block.1.1`), see
`wurst_jax.convert.effnet`.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from wurst_jax.models import layers

Dtype = Any

# (block type, expand ratio, kernel, stride, in channels, out channels, layers): torchvision
# `_efficientnet_conf('efficientnet_v2_s')` (channel counts after its width rounding).
EFFICIENTNET_V2_S = (
    ('fused', 1, 3, 1, 24, 24, 2),
    ('fused', 4, 3, 2, 24, 48, 4),
    ('fused', 4, 3, 2, 48, 64, 4),
    ('mb', 4, 3, 2, 64, 128, 6),
    ('mb', 6, 3, 1, 128, 160, 9),
    ('mb', 6, 3, 2, 160, 256, 15),
)
# torchvision `_efficientnet_conf('efficientnet_v2_l')`: Würstchen v1's compressor (dome272/Wuerstchen
# train_stage_B.py, `EfficientNetEncoder(effnet="efficientnet_v2_l")`), head 1280 as V2-S's. Its torchvision
# ImageNet weights expect mean = std = 0.5 inputs, but Würstchen feeds it ImageNet-normalised images
# (utils.py `effnet_preprocess`) and fine-tunes it jointly with Stage B, so `normalize_input` is the same.
EFFICIENTNET_V2_L = (
    ('fused', 1, 3, 1, 32, 32, 4),
    ('fused', 4, 3, 2, 32, 64, 7),
    ('fused', 4, 3, 2, 64, 96, 7),
    ('mb', 4, 3, 2, 96, 192, 10),
    ('mb', 6, 3, 1, 192, 224, 19),
    ('mb', 6, 3, 2, 224, 384, 25),
    ('mb', 6, 3, 1, 384, 640, 7),
)
EFFNET_ARCHS = {'efficientnet_v2_s': EFFICIENTNET_V2_S, 'efficientnet_v2_l': EFFICIENTNET_V2_L}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's `_make_divisible` (round to a multiple of 8, never more than 10% down)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class ConvNormAct(nn.Module):
    """torchvision Conv2dNormActivation: conv (no bias, padding (k-1)//2) -> BN(eps 1e-3) -> optional SiLU."""

    features: int
    kernel: int = 1
    stride: int = 1
    groups: int = 1
    activation: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        p = (self.kernel - 1) // 2
        axes = (None, None) if self.groups > 1 else ('conv_in', 'conv_out')
        x = layers.conv(
            self.features,
            (self.kernel, self.kernel),
            strides=self.stride,
            padding=((p, p), (p, p)),
            groups=self.groups,
            use_bias=False,
            axes=axes,
            dtype=self.dtype,
            name='conv',
        )(x)
        x = layers.BatchNorm(epsilon=1e-3, dtype=self.dtype, name='norm')(x, use_running_average=not train)
        return nn.silu(x) if self.activation else x


class SqueezeExcitation(nn.Module):
    """torchvision SqueezeExcitation with SiLU: x * sigmoid(fc2(silu(fc1(mean_hw(x)))))."""

    squeeze_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = nn.silu(layers.conv(self.squeeze_channels, (1, 1), padding='VALID', dtype=self.dtype, name='fc1')(s))
        s = layers.conv(x.shape[-1], (1, 1), padding='VALID', dtype=self.dtype, name='fc2')(s)
        return x * nn.sigmoid(s)


class MBConvBlock(nn.Module):
    """torchvision FusedMBConv ('fused') or MBConv ('mb'); submodules `block_{i}` as in `.block.{i}`."""

    block_type: str
    expand_ratio: float
    kernel: int
    stride: int
    in_ch: int
    out_ch: int
    drop_rate: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        expanded = make_divisible(self.in_ch * self.expand_ratio)
        cna = lambda i, *a, **kw: ConvNormAct(*a, dtype=self.dtype, name=f'block_{i}', **kw)
        h, i = x, 0
        if self.block_type == 'fused':
            if expanded != self.in_ch:
                h = cna(0, expanded, self.kernel, self.stride)(h, train)
                h = cna(1, self.out_ch, 1, activation=False)(h, train)
            else:
                h = cna(0, self.out_ch, self.kernel, self.stride)(h, train)
        elif self.block_type == 'mb':
            if expanded != self.in_ch:
                h = cna(i, expanded, 1)(h, train)
                i += 1
            h = cna(i, expanded, self.kernel, self.stride, groups=expanded)(h, train)
            h = SqueezeExcitation(max(1, self.in_ch // 4), self.dtype, name=f'block_{i + 1}')(h)
            h = cna(i + 2, self.out_ch, 1, activation=False)(h, train)
        else:
            raise ValueError(f"block_type must be 'fused' or 'mb', got {self.block_type!r}")
        if self.stride == 1 and self.in_ch == self.out_ch:
            # Stochastic depth, "row" mode: one Bernoulli(1 - p) per sample, kept branches scaled by 1/(1 - p).
            h = nn.Dropout(self.drop_rate, broadcast_dims=(1, 2, 3))(h, deterministic=not train)
            h = h + x
        return h


class EfficientNetEncoder(nn.Module):
    """EfficientNetV2 features + mapper: images [B, H, W, 3] -> latents [B, H/32, W/32, c_latent] (see module doc).

    `stages` rows: (block type 'fused' | 'mb', expand ratio, kernel, stride, in channels, out channels, layers);
    the stem has stages[0]'s in channels. `last_channels` is the head conv's width (torchvision: 1280 for V2,
    4 * last stage width when not given; 0 here means that default).
    """

    stages: Sequence[tuple] = EFFICIENTNET_V2_S
    last_channels: int = 1280
    c_latent: int = 16
    mapper_affine: bool = True
    output_scaling: str = 'none'  # 'none' (Stable Cascade) or 'v2': (x + 1) / 42 (Würstchen v2)
    normalize_input: bool = True
    stochastic_depth_prob: float = 0.2
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        if self.output_scaling not in ('none', 'v2'):
            raise ValueError(f"output_scaling must be 'none' or 'v2', got {self.output_scaling!r}")
        x = images.astype(jnp.float32)
        if self.normalize_input:
            x = (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
        x = x.astype(self.dtype)
        x = ConvNormAct(self.stages[0][4], 3, 2, dtype=self.dtype, name='backbone_0')(x, train)
        total = sum(s[6] for s in self.stages)
        block_id = 0
        for s, (block_type, ratio, kernel, stride, in_ch, out_ch, num_layers) in enumerate(self.stages):
            for b in range(num_layers):
                x = MBConvBlock(
                    block_type,
                    ratio,
                    kernel,
                    stride if b == 0 else 1,
                    in_ch if b == 0 else out_ch,
                    out_ch,
                    self.stochastic_depth_prob * block_id / total,
                    self.dtype,
                    name=f'backbone_{s + 1}_{b}',
                )(x, train)
                block_id += 1
        last = self.last_channels or 4 * self.stages[-1][5]
        x = ConvNormAct(last, 1, dtype=self.dtype, name=f'backbone_{len(self.stages) + 1}')(x, train)
        x = layers.conv(self.c_latent, (1, 1), padding='VALID', use_bias=False, dtype=self.dtype, name='mapper_0')(x)
        x = layers.BatchNorm(epsilon=1e-5, affine=self.mapper_affine, name='mapper_1')(
            x.astype(jnp.float32), use_running_average=not train
        )
        if self.output_scaling == 'v2':
            x = (x + 1.0) / 42.0
        return x
