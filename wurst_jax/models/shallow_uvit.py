"""Pixel-space denoisers of greedy growing (Vasconcelos et al., "Greedy Growing Enables High-Resolution
Pixel-Based Diffusion Models", arXiv:2405.16759), NHWC.

`ShallowUViT` is the model the core is trained in: an entry convolution that patchifies the image
(stride `patch_size`) to the core grid, one residual block as the encoder, the deep text-conditional
`UViTCore`, one residual block as the decoder, and an exit layer back to pixels (a Dense to
patch_size² · 3 channels, pixel-shuffled). `GrownUNet` is the model the core is grown into: a 3x3
entry convolution at full resolution, `len(level_channels)` encoder levels (residual block, then a
2x2 stride-2 convolution) down to the core grid, the same `UViTCore`, the mirrored decoder levels
(a 2x2 stride-2 transposed convolution, then a residual block fed the encoder's skip), and a 3x3 exit
convolution. Both return the raw prediction (v) for x [B, H, W, 3] at times r [B] given text [B, L, D].

Param names are what growing copies (`wurst_jax.growing`): `core`, and per level `encoder_k`,
`down_k`, `up_k`, `decoder_k` with k counted from the core outward, so a model grown again keeps its levels' names and
the new outermost level gets the next index; `entry` and `exit` always belong to one resolution.

Choices made here that the paper's abstract and Figure 1 caption do not settle:
* The core's block is Würstchen's prior block (`stage_c.PriorBlock`: ConvNeXt residual block, FiLM by
  the time, then self- and cross-attention in one softmax over [image tokens, text tokens]), with
  fixed 2-D sin-cos positions added at the core's input. It is the block this repository already
  trains on the shapes grammar, where it learns "on the left"; a U-ViT core of plain transformer
  blocks would be the same idea with another MLP.
* Text enters the core only: the paper places text–image alignment in the core, and the grown
  levels, trained with the core frozen, can then only learn rendering.
* Every residual block outside the core is FiLM-modulated by the time embedding (a TimestepBlock):
  how much to denoise at full resolution depends on the noise level.
* One residual block per level and a 2x stride per level (`GrownUNet`); widths are `level_channels`,
  from the core outward. The transposed convolution and strided convolution are the simplest learnt
  resamplers; the skip is concatenated after the block's norm, as in Stage B.
* The exit layers start at zero, so a fresh model predicts v = 0 and a grown model's first steps do
  not send large gradients through the frozen core.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from wurst_jax.models import layers
from wurst_jax.models.stage_c import PriorBlock

Dtype = Any


class UViTCore(nn.Module):
    """The deep, text-conditional part: [B, h, w, c] features at the core grid -> [B, h, w, c]."""

    c: int
    depth: int
    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, r_emb: jax.Array, text: jax.Array) -> jax.Array:
        """x: [B, h, w, c], r_emb: [B, c_r], text: [B, L, D] -> [B, h, w, c]."""
        h = x + layers.sincos_2d(x.shape[1], x.shape[2], self.c).astype(x.dtype)
        cond = layers.cond_mapper(text, self.c, self.dtype)
        for k in range(self.depth):
            h = PriorBlock(self.c, self.num_heads, dtype=self.dtype, name=f'blocks_{k}')(h, r_emb, cond)
        return layers.layer_norm_2d(self.dtype)(h)


class TimedResBlock(nn.Module):
    """A residual block (with an optional skip input) followed by FiLM by the time embedding."""

    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, r_emb: jax.Array, skip: jax.Array | None = None) -> jax.Array:
        x = layers.ResBlock(self.channels, dtype=self.dtype, name='res')(x, skip)
        return layers.TimestepBlock(self.channels, self.dtype, name='time')(x, r_emb)


class ShallowUViT(nn.Module):
    """x: [B, H, W, 3], r: [B] in [0, 1], text: [B, L, D] -> [B, H, W, 3]; H, W multiples of patch_size."""

    c: int = 128
    depth: int = 4
    num_heads: int = 4
    c_r: int = 64
    patch_size: int = 2
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, r: jax.Array, text: jax.Array) -> jax.Array:
        p = self.patch_size
        r_emb = layers.gen_r_embedding(r, self.c_r)
        h = layers.conv(self.c, (p, p), strides=p, padding='VALID', dtype=self.dtype, name='entry')(
            x.astype(self.dtype)
        )
        h = TimedResBlock(self.c, self.dtype, name='encoder')(h, r_emb)
        h = UViTCore(self.c, self.depth, self.num_heads, self.dtype, name='core')(h, r_emb, text)
        h = TimedResBlock(self.c, self.dtype, name='decoder')(h, r_emb)
        out = layers.dense(
            p * p * x.shape[-1],
            ('embed', None),
            dtype=self.dtype,
            kernel_init=nn.initializers.zeros_init(),
            name='exit',
        )(layers.layer_norm_2d(self.dtype)(h))
        return layers.pixel_shuffle(out, p).astype(jnp.float32)


class GrownUNet(nn.Module):
    """x: [B, H, W, 3], r: [B] in [0, 1], text: [B, L, D] -> [B, H, W, 3]; the core runs at H / 2^levels."""

    c: int = 128
    depth: int = 4
    num_heads: int = 4
    c_r: int = 64
    level_channels: Sequence[int] = (64, 32)  # from the core outward
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, r: jax.Array, text: jax.Array) -> jax.Array:
        widths = tuple(self.level_channels)
        r_emb = layers.gen_r_embedding(r, self.c_r)
        h = layers.conv(widths[-1], (3, 3), dtype=self.dtype, name='entry')(x.astype(self.dtype))
        skips = []
        for k in reversed(range(len(widths))):  # outermost level first
            h = TimedResBlock(widths[k], self.dtype, name=f'encoder_{k}')(h, r_emb)
            skips.append(h)
            inner = widths[k - 1] if k else self.c
            h = layers.conv(inner, (2, 2), strides=2, padding='VALID', dtype=self.dtype, name=f'down_{k}')(h)
        h = UViTCore(self.c, self.depth, self.num_heads, self.dtype, name='core')(h, r_emb, text)
        for k in range(len(widths)):
            h = layers.conv_transpose(widths[k], (2, 2), strides=2, torch_padding=0, dtype=self.dtype, name=f'up_{k}')(
                h
            )
            h = TimedResBlock(widths[k], self.dtype, name=f'decoder_{k}')(h, r_emb, skips.pop())
        out = layers.conv(x.shape[-1], (3, 3), dtype=self.dtype, kernel_init=nn.initializers.zeros_init(), name='exit')(
            layers.layer_norm_2d(self.dtype)(h)
        )
        return out.astype(jnp.float32)
