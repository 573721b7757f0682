"""Stage C: Würstchen v2's text-conditional prior (diffusers `WuerstchenPrior`), NHWC.

A 1x1 projection, `depth` identical (ResBlock, TimestepBlock, AttnBlock) triplets at one
resolution, and an output that turns the predicted (a, b) into the noise estimate
(x - a) / (|1 - b| + 1e-5) (dome272/Wuerstchen `modules.py` `Prior`; diffusers
`src/diffusers/pipelines/wuerstchen/modeling_wuerstchen_prior.py`). `pos_embed` (not in the reference) adds a fixed
2-D sin-cos position embedding after the projection: attention has no notion of place, and a
shallow prior on a small map cannot infer "on the left" from its convs' borders. `linear_output` (not in the
reference either) returns the output conv's value itself, for v-prediction: v ≈ −x0 at high noise is
far from x, and dividing by a learnt |1 − b| then diverges. With `scan_blocks` the triplets are one
`nn.scan` over stacked params (fast compiles for depth 32), optionally rematerialised.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wurst_jax.models import layers

Dtype = Any


class PriorBlock(nn.Module):
    """One ResBlock -> TimestepBlock -> AttnBlock triplet."""

    channels: int
    num_heads: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    def setup(self):
        self.res = layers.ResBlock(self.channels, self.dropout, dtype=self.dtype)
        self.timestep = layers.TimestepBlock(self.channels, self.dtype)
        self.attn = layers.AttnBlock(self.channels, self.num_heads, True, self.dropout, self.dtype)

    def __call__(self, x: jax.Array, r_emb: jax.Array, cond: jax.Array, deterministic: bool = True) -> jax.Array:
        x = self.res(x, deterministic=deterministic)
        x = self.timestep(x, r_emb)
        return self.attn(x, cond, deterministic)


class PriorScanStep(PriorBlock):
    """PriorBlock in nn.scan's (carry, xs) -> (carry, ys) form."""

    def __call__(self, x, r_emb, cond, deterministic):
        return super().__call__(x, r_emb, cond, deterministic), None


class WuerstchenPrior(nn.Module):
    """x: [B, h, w, c_in] noisy latents, r: [B] time in [0, 1], cond: [B, L, c_cond] -> eps [B, h, w, c_in]."""

    c_in: int = 16
    c: int = 1536
    c_cond: int = 1280
    c_r: int = 64
    depth: int = 32
    num_heads: int = 24
    dropout: float = 0.1
    scan_blocks: bool = False
    remat_policy: str = 'none'
    pos_embed: bool = False
    linear_output: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, r: jax.Array, cond: jax.Array, deterministic: bool = True) -> jax.Array:
        x_in = x.astype(jnp.float32)
        h = layers.conv(self.c, (1, 1), dtype=self.dtype, name='projection')(x.astype(self.dtype))
        if self.pos_embed:
            h = h + layers.sincos_2d(h.shape[1], h.shape[2], self.c).astype(self.dtype)
        c_embed = layers.cond_mapper(cond, self.c, self.dtype)
        r_emb = layers.gen_r_embedding(r, self.c_r)
        block_args = dict(channels=self.c, num_heads=self.num_heads, dropout=self.dropout, dtype=self.dtype)
        if self.scan_blocks:
            scan = layers.scanned(PriorScanStep, self.depth, 3, self.remat_policy, deterministic_argnum=4)
            h, _ = scan(**block_args, name='blocks')(h, r_emb, c_embed, deterministic)
        else:
            block_cls = layers.remat(PriorBlock, self.remat_policy, deterministic_argnum=4)
            for k in range(self.depth):
                h = block_cls(**block_args, name=f'blocks_{k}')(h, r_emb, c_embed, deterministic)
        h = layers.layer_norm_2d(self.dtype)(h)
        if self.linear_output:
            return layers.conv(
                self.c_in, (1, 1), dtype=self.dtype, kernel_init=nn.initializers.zeros_init(), name='out'
            )(h).astype(jnp.float32)
        # Zero init, as Würstchen's: a = b = 0 at the start, so the output is x itself, not a division
        # by a random |1 - b| that can be near zero.
        ab = layers.conv(2 * self.c_in, (1, 1), dtype=self.dtype, kernel_init=nn.initializers.zeros_init(), name='out')(
            h
        ).astype(jnp.float32)
        a, b = jnp.split(ab, 2, axis=-1)
        return (x_in - a) / (jnp.abs(1 - b) + 1e-5)
