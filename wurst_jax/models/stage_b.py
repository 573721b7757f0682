"""Stage B: Würstchen v2's decoder (diffusers `WuerstchenDiffNeXt`), NHWC.

A U-Net over Stage A latents (dome272/Wuerstchen `modules.py` `DiffNeXt`): pixel-unshuffle embedding, levels of
(ResBlock, TimestepBlock[, AttnBlock]) with a k2/s2 conv down and transposed conv up, the Stage C
map injected at every injecting level (resized exactly as torch's bicubic antialias,
align_corners resize, mapped by a 1x1 conv and concatenated into every ResBlock as a skip), CLIP
tokens through cross-attention, and the output (x - a) / b' with b' = sigmoid(b)·(1 - 2e-3) + 1e-3.

Module names are the torch ones with dots as underscores (`down_blocks_1_3` is
`down_blocks.1.3`), so conversion is a rename.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from wurst_jax.models import layers
from wurst_jax.models.resize import resize

Dtype = Any


class WuerstchenDiffNeXt(nn.Module):
    """x: [B, H, W, c_in] noisy latents, r: [B] time, effnet: [B, h, w, effnet_embd], clip: [B, L, clip_embd]
    -> eps [B, H, W, c_out]. H and W must divide by patch_size * 2 ** (levels - 1)."""

    c_in: int = 4
    c_out: int = 4
    c_r: int = 64
    patch_size: int = 2
    c_cond: int = 1024
    c_hidden: Sequence[int] = (320, 640, 1280, 1280)
    nhead: Sequence[int] = (-1, 10, 20, 20)
    blocks: Sequence[int] = (4, 4, 14, 4)
    level_config: Sequence[str] = ('CT', 'CTA', 'CTA', 'CTA')
    inject_effnet: Sequence[bool] = (False, True, True, True)
    effnet_embd: int = 16
    clip_embd: int = 1024
    kernel_size: int = 3
    dropout: float | Sequence[float] = 0.1
    remat_policy: str = 'none'  # per block: one of layers.REMAT_POLICIES
    dtype: Dtype = jnp.float32

    def _block(self, kind: str, level: int, name: str):
        c, dropout, policy = self.c_hidden[level], self._dropouts()[level], self.remat_policy
        if kind == 'C':
            return layers.remat(layers.ResBlock, policy, deterministic_argnum=3)(
                c, dropout, self.kernel_size, self.dtype, name=name
            )
        if kind == 'T':
            return layers.remat(layers.TimestepBlock, policy)(c, self.dtype, name=name)
        if kind == 'A':
            return layers.remat(layers.AttnBlock, policy, deterministic_argnum=3)(
                c, self.nhead[level], True, dropout, self.dtype, name=name
            )
        raise ValueError(f'level_config block type {kind!r} is not one of C, T, A')

    def _dropouts(self) -> tuple[float, ...]:
        if isinstance(self.dropout, (int, float)):
            return (float(self.dropout),) * len(self.c_hidden)
        return tuple(self.dropout)

    def _effnet_condition(self, effnet: jax.Array, slot: int, size: tuple[int, int]) -> jax.Array:
        resized = resize(effnet, size, 'bicubic_antialias').astype(self.dtype)
        return layers.conv(
            self.c_cond,
            (1, 1),
            dtype=self.dtype,
            kernel_init=nn.initializers.normal(0.02),
            name=f'effnet_mappers_{slot}',
        )(resized)

    def _run(self, block, kind: str, h, r_emb, clip, skip, deterministic):
        if kind == 'C':
            return block(h, skip, deterministic)
        if kind == 'T':
            return block(h, r_emb)
        return block(h, clip, deterministic)

    @nn.compact
    def __call__(
        self, x: jax.Array, r: jax.Array, effnet: jax.Array, clip: jax.Array, deterministic: bool = True
    ) -> jax.Array:
        levels, p, dt = len(self.c_hidden), self.patch_size, self.dtype
        x_in = x.astype(jnp.float32)
        r_emb = layers.gen_r_embedding(r, self.c_r)
        clip = layers.dense(
            self.c_cond, (None, 'embed'), dtype=dt, kernel_init=nn.initializers.normal(0.02), name='clip_mapper'
        )(clip.astype(dt))
        clip = layers.layer_norm_2d(dt)(clip)  # seq_norm: the same affine-free LN over the token width
        h = layers.pixel_unshuffle(x.astype(dt), p)
        h = layers.layer_norm_2d(dt)(layers.conv(self.c_hidden[0], (1, 1), dtype=dt, name='embedding_1')(h))

        level_outputs = []  # deepest first, as the up path consumes them
        for i in range(levels):
            index = 0
            if i > 0:
                h = layers.downscale(h, self.c_hidden[i], dt, f'down_blocks_{i}_0_1')
                index = 1
            effnet_c = self._effnet_condition(effnet, i, h.shape[1:3]) if self.inject_effnet[i] else None
            for _ in range(self.blocks[i]):
                for kind in self.level_config[i]:
                    block = self._block(kind, i, f'down_blocks_{i}_{index}')
                    h = self._run(block, kind, h, r_emb, clip, effnet_c, deterministic)
                    index += 1
            level_outputs.insert(0, h)

        h = level_outputs[0]
        for u in range(levels):
            i = levels - 1 - u
            effnet_c = self._effnet_condition(effnet, levels + u, h.shape[1:3]) if self.inject_effnet[i] else None
            index = 0
            for _ in range(self.blocks[i]):
                for kind in self.level_config[i]:
                    skip = effnet_c
                    if index == 0 and u > 0:  # the first block of a level also takes the encoder output
                        skip = (
                            level_outputs[u]
                            if effnet_c is None
                            else jnp.concatenate([level_outputs[u], effnet_c], axis=-1)
                        )
                    block = self._block(kind, i, f'up_blocks_{u}_{index}')
                    h = self._run(block, kind, h, r_emb, clip, skip, deterministic)
                    index += 1
            if i > 0:
                h = layers.upscale(h, self.c_hidden[i - 1], dt, f'up_blocks_{u}_{index}_1')

        h = layers.layer_norm_2d(dt)(h)
        h = layers.conv(
            2 * self.c_out * p * p, (1, 1), dtype=dt, kernel_init=nn.initializers.zeros_init(), name='clf_1'
        )(h)
        a, b = jnp.split(layers.pixel_shuffle(h, p).astype(jnp.float32), 2, axis=-1)
        b = jax.nn.sigmoid(b) * (1 - 2e-3) + 1e-3
        return (x_in - a) / b
