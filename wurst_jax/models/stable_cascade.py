"""Stable Cascade's UNet (Würstchen v3), its Stage C prior and its Stage B decoder, NHWC.

One network in two configurations (Stability-AI/StableCascade `modules/stage_c.py` and
`modules/stage_b.py`; diffusers `models/unets/unet_stable_cascade.py` `StableCascadeUNet`): a 1x1
embedding (after a pixel-unshuffle), levels of ResBlock / TimestepBlock / AttnBlock whose block list
may run several times with a 1x1 conv between runs (`*_blocks_repeat_mappers`), LN2d + a k2/s2 conv
(or, with `switch_level`, a 1x1 conv and an optional 2x bilinear resize) between levels, and an
LN2d -> 1x1 conv -> pixel-shuffle head predicting ε. The conditioning tokens are the pooled CLIP text
embedding mapped to `clip_seq` tokens, with, for Stage C, the CLIP text states and `clip_seq` tokens
of the CLIP image embedding before and after it. Stage B adds the resized EfficientNet map and a
pixel map (zeros unless given) to the embedded input. The time condition is the embedding of r and of
each `timestep_conditioning_type` value ('sca', 'crp'; zero when not given).

Fields are diffusers' config keys; module names are its module paths with dots as underscores
(`down_blocks_1_3` is `down_blocks.1.3`), so conversion is a rename.
"""

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from wurst_jax.models import layers
from wurst_jax.models.resize import resize

Dtype = Any
RES, TIMESTEP, ATTN = 'SDCascadeResBlock', 'SDCascadeTimestepBlock', 'SDCascadeAttnBlock'

# The released networks (diffusers `scripts/convert_stable_cascade.py`; the lite sizes as the 1B / 700M models
# of Stability-AI/StableCascade `train/train_c.py` and `train/train_b.py`): fields that differ from the defaults.
_STAGE_B = dict(
    in_channels=4,
    out_channels=4,
    patch_size=2,
    conditioning_dim=1280,
    block_out_channels=(320, 640, 1280, 1280),
    num_attention_heads=(0, 0, 20, 20),
    down_num_layers_per_block=(2, 6, 28, 6),
    up_num_layers_per_block=(6, 28, 6, 2),
    down_blocks_repeat_mappers=(1, 1, 1, 1),
    up_blocks_repeat_mappers=(3, 3, 2, 2),
    block_types_per_layer=((RES, TIMESTEP),) * 2 + ((RES, TIMESTEP, ATTN),) * 2,
    effnet_in_channels=16,
    pixel_mapper_in_channels=3,
    dropout=(0.0, 0.0, 0.1, 0.1),
    timestep_conditioning_type=('sca',),
)
_STAGE_C = dict(clip_text_in_channels=1280, clip_image_in_channels=768, switch_level=(False,))
RELEASED = {
    'stage_c': _STAGE_C,
    'stage_c_lite': dict(
        _STAGE_C,
        conditioning_dim=1536,
        block_out_channels=(1536, 1536),
        num_attention_heads=(24, 24),
        down_num_layers_per_block=(4, 12),
        up_num_layers_per_block=(12, 4),
    ),
    'stage_b': _STAGE_B,
    'stage_b_lite': dict(
        _STAGE_B,
        block_out_channels=(320, 576, 1152, 1152),
        num_attention_heads=(0, 9, 18, 18),
        down_num_layers_per_block=(2, 4, 14, 4),
        up_num_layers_per_block=(4, 14, 4, 2),
        up_blocks_repeat_mappers=(2, 2, 2, 2),
    ),
}


def _resize_to(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """torch's bilinear align_corners=True resize in float32 (as the official code casts), back in x's dtype."""
    return x if tuple(x.shape[1:3]) == tuple(size) else resize(x, size, 'bilinear').astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class LevelBlocks:
    """What the blocks of one level share; `make` builds one of them."""

    types: tuple[str, ...]
    channels: int
    num_heads: int
    dropout: float
    self_attn: bool
    kernel_size: int
    conds: tuple[str, ...]
    out_init_scale: float
    dtype: Dtype

    def make(self, kind: str, remat_policy: str, name: str) -> nn.Module:
        c, dt = self.channels, self.dtype
        if kind == RES:
            return layers.remat(layers.ResBlock, remat_policy, deterministic_argnum=3)(
                c, self.dropout, self.kernel_size, dt, out_init_scale=self.out_init_scale, name=name
            )
        if kind == TIMESTEP:
            return layers.remat(layers.TimestepBlock, remat_policy)(c, dt, self.conds, name=name)
        return layers.remat(layers.AttnBlock, remat_policy, deterministic_argnum=3)(
            c, self.num_heads, self.self_attn, self.dropout, dt, name=name
        )


def run_block(block: nn.Module, kind: str, h, r_emb, clip, skip, deterministic):
    if kind == RES:
        if skip is not None:  # an odd size halved and doubled comes back one short: resize to the skip
            h = _resize_to(h, skip.shape[1:3])
        return block(h, skip, deterministic)
    if kind == TIMESTEP:
        return block(h, r_emb)
    return block(h, clip, deterministic)


class CascadeGroup(nn.Module):
    """One pass of a level's block list (`block_{k}`), without skips: the step that scan_blocks repeats."""

    blocks: LevelBlocks

    @nn.compact
    def __call__(self, h, r_emb, clip, deterministic):
        for k, kind in enumerate(self.blocks.types):
            h = run_block(self.blocks.make(kind, 'none', f'block_{k}'), kind, h, r_emb, clip, None, deterministic)
        return h, None  # nn.scan's (carry, ys)


class StableCascadeUNet(nn.Module):
    """x: [B, H, W, in_channels] noisy latents, r: [B] time ratio, clip_text_pooled: [B, N, pooled] (or [B, pooled])
    -> ε [B, H, W, out_channels]. Stage C also takes clip_text [B, L, text] with clip_img [B, M, image] (both or
    neither: the pipelines pass zeros for no image); Stage B takes effnet [B, h, w, effnet] and optionally
    pixels [B, h', w', 3]; sca / crp: [B] or None (zeros)."""

    in_channels: int = 16
    out_channels: int = 16
    timestep_ratio_embedding_dim: int = 64
    patch_size: int = 1
    conditioning_dim: int = 2048
    block_out_channels: Sequence[int] = (2048, 2048)
    num_attention_heads: Sequence[int] = (32, 32)
    down_num_layers_per_block: Sequence[int] = (8, 24)
    up_num_layers_per_block: Sequence[int] = (24, 8)
    down_blocks_repeat_mappers: Sequence[int] = (1, 1)
    up_blocks_repeat_mappers: Sequence[int] = (1, 1)
    block_types_per_layer: Sequence[Sequence[str]] = ((RES, TIMESTEP, ATTN), (RES, TIMESTEP, ATTN))
    clip_text_in_channels: int | None = None
    clip_text_pooled_in_channels: int = 1280
    clip_image_in_channels: int | None = None
    clip_seq: int = 4
    effnet_in_channels: int | None = None
    pixel_mapper_in_channels: int | None = None
    kernel_size: int = 3
    dropout: float | Sequence[float] = (0.1, 0.1)
    self_attn: bool | Sequence[bool] = True
    timestep_conditioning_type: Sequence[str] = ('sca', 'crp')
    switch_level: Sequence[bool] | None = None
    scan_blocks: bool = False  # each level's repeated block lists as one nn.scan (compiles once per level)
    remat_policy: str = 'none'  # per block (per scanned pass with scan_blocks): one of layers.REMAT_POLICIES
    dtype: Dtype = jnp.float32

    def _check_fields(self) -> None:
        levels = len(self.block_out_channels)
        for field in (
            'num_attention_heads',
            'down_num_layers_per_block',
            'up_num_layers_per_block',
            'down_blocks_repeat_mappers',
            'up_blocks_repeat_mappers',
            'block_types_per_layer',
        ):
            if len(getattr(self, field)) != levels:
                raise ValueError(
                    f'StableCascadeUNet.{field} has {len(getattr(self, field))} entries, '
                    f'block_out_channels {levels}: give one per level'
                )
        if self.switch_level is not None and len(self.switch_level) != levels - 1:
            raise ValueError(f'StableCascadeUNet.switch_level needs {levels - 1} entries (one per level step)')
        for types in self.block_types_per_layer:
            unknown = [t for t in types if t not in (RES, TIMESTEP, ATTN)]
            if unknown:
                raise ValueError(f'block_types_per_layer: {unknown} not one of {RES}, {TIMESTEP}, {ATTN}')

    def _per_level(self, value) -> tuple:
        return (value,) * len(self.block_out_channels) if isinstance(value, (bool, int, float)) else tuple(value)

    def _level(self, level: int) -> LevelBlocks:
        # The official init scales every ResBlock's last Linear by sqrt(1 / down blocks of all levels).
        return LevelBlocks(
            tuple(self.block_types_per_layer[level]),
            self.block_out_channels[level],
            self.num_attention_heads[level],
            self._per_level(self.dropout)[level],
            self._per_level(self.self_attn)[level],
            self.kernel_size,
            tuple(self.timestep_conditioning_type),
            (1 / sum(self.down_num_layers_per_block)) ** 0.5,
            self.dtype,
        )

    def scan_groups(self) -> list[tuple[str, str, int, int, int]]:
        """With scan_blocks: (scan module name, torch prefix, first torch index, repeats, blocks per repeat) of
        every scanned run of a level's block list; an up level's first pass (it takes the skip) stays apart."""
        groups, levels = [], len(self.block_out_channels)
        for i in range(levels):
            per = len(self.block_types_per_layer[i])
            groups.append((f'down_blocks_{i}_scan', f'down_blocks_{i}', 0, self.down_num_layers_per_block[i], per))
        for u in range(levels):
            per, first = len(self.block_types_per_layer[levels - 1 - u]), int(u > 0)
            groups.append(
                (f'up_blocks_{u}_scan', f'up_blocks_{u}', first * per, self.up_num_layers_per_block[u] - first, per)
            )
        return [g for g in groups if g[3] > 0]

    def _level_pass(self, level: int, count: int, prefix: str, first_apart: bool):
        """A function running `count` passes of the level's block list once: each block its own params, or with
        scan_blocks one scan over stacked params (`first_apart`: the first pass unscanned)."""
        spec = self._level(level)
        per = len(spec.types)
        apart = 1 if (self.scan_blocks and first_apart) else (0 if self.scan_blocks else count)
        blocks = [
            (kind, spec.make(kind, self.remat_policy, f'{prefix}_{g * per + k}'))
            for g in range(min(apart, count))
            for k, kind in enumerate(spec.types)
        ]
        scan = None
        if self.scan_blocks and count > apart:
            scan = layers.scanned(CascadeGroup, count - apart, 3, self.remat_policy, deterministic_argnum=4)(
                spec, name=f'{prefix}_scan'
            )

        def run(h, r_emb, clip, skip, deterministic):
            for index, (kind, block) in enumerate(blocks):
                h = run_block(block, kind, h, r_emb, clip, skip if index == 0 else None, deterministic)
            if scan is not None:
                h, _ = scan(h, r_emb, clip, deterministic)
            return h

        return run

    def _time_embedding(self, r: jax.Array, conds: dict[str, jax.Array | None]) -> jax.Array:
        dim = self.timestep_ratio_embedding_dim
        embeddings = [layers.gen_r_embedding(r, dim)]
        for name in self.timestep_conditioning_type:
            value = conds.get(name)
            embeddings.append(layers.gen_r_embedding(jnp.zeros_like(r) if value is None else value, dim))
        return jnp.concatenate(embeddings, axis=-1)

    def _clip_tokens(self, pooled: jax.Array, text: jax.Array | None, image: jax.Array | None) -> jax.Array:
        c, dt = self.conditioning_dim, self.dtype
        init = nn.initializers.normal(0.02)

        def to_seq(tokens, name):  # [B, N, D] -> [B, N * clip_seq, c]
            tokens = tokens[:, None] if tokens.ndim == 2 else tokens
            out = layers.dense(c * self.clip_seq, (None, 'embed'), dtype=dt, kernel_init=init, name=name)(
                tokens.astype(dt)
            )
            return out.reshape(out.shape[0], -1, c)

        clip = to_seq(pooled, 'clip_txt_pooled_mapper')
        if (text is None) != (image is None):
            raise ValueError(
                'StableCascadeUNet takes clip_text and clip_img together (pass zeros as clip_img for text only, '
                'as StableCascadePriorPipeline does); with neither it conditions on the pooled text alone'
            )
        if text is not None:
            if self.clip_text_in_channels is None or self.clip_image_in_channels is None:
                raise ValueError(
                    'clip_text / clip_img given to a StableCascadeUNet without clip_text_in_channels and '
                    'clip_image_in_channels (a Stage B): pass only clip_text_pooled'
                )
            text = layers.dense(c, (None, 'embed'), dtype=dt, kernel_init=init, name='clip_txt_mapper')(text.astype(dt))
            clip = jnp.concatenate([text, clip, to_seq(image, 'clip_img_mapper')], axis=1)
        return layers.layer_norm_2d(dt)(clip)

    def _map_condition(self, cond: jax.Array, name: str) -> jax.Array:
        """`{name}_0` 1x1 conv to 4C -> GELU -> `{name}_2` 1x1 conv to C -> LN2d (the effnet and pixels mappers)."""
        c, dt = self.block_out_channels[0], self.dtype
        init = nn.initializers.normal(0.02)
        h = layers.conv(4 * c, (1, 1), dtype=dt, kernel_init=init, name=f'{name}_0')(cond.astype(dt))
        h = layers.conv(c, (1, 1), dtype=dt, kernel_init=init, name=f'{name}_2')(nn.gelu(h, approximate=False))
        return layers.layer_norm_2d(dt)(h)

    def _run_level(self, h, level_pass, repeats, mapper_prefix, r_emb, clip, skip, deterministic):
        """The level's passes `repeats` times (the same params each time), a 1x1 conv between repeats."""
        for rep in range(repeats):
            h = level_pass(h, r_emb, clip, skip, deterministic)
            if rep < repeats - 1:
                h = layers.conv(h.shape[-1], (1, 1), dtype=self.dtype, name=f'{mapper_prefix}_{rep}')(h)
        return h

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        r: jax.Array,
        clip_text_pooled: jax.Array,
        clip_text: jax.Array | None = None,
        clip_img: jax.Array | None = None,
        effnet: jax.Array | None = None,
        pixels: jax.Array | None = None,
        sca: jax.Array | None = None,
        crp: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        self._check_fields()
        levels, p, dt = len(self.block_out_channels), self.patch_size, self.dtype
        r_emb = self._time_embedding(r, {'sca': sca, 'crp': crp})
        clip = self._clip_tokens(clip_text_pooled, clip_text, clip_img)

        h = layers.pixel_unshuffle(x.astype(dt), p)
        embed_init = nn.initializers.variance_scaling(0.02**2, 'fan_avg', 'uniform')  # xavier_uniform, gain 0.02
        h = layers.conv(self.block_out_channels[0], (1, 1), dtype=dt, kernel_init=embed_init, name='embedding_1')(h)
        h = layers.layer_norm_2d(dt)(h)
        if effnet is not None:
            if self.effnet_in_channels is None:
                raise ValueError('effnet given to a StableCascadeUNet without effnet_in_channels (a Stage C)')
            h = h + self._map_condition(_resize_to(effnet.astype(jnp.float32), h.shape[1:3]), 'effnet_mapper')
        if self.pixel_mapper_in_channels is not None:
            if pixels is None:
                pixels = jnp.zeros((x.shape[0], 8, 8, self.pixel_mapper_in_channels), dt)
            h = h + _resize_to(self._map_condition(pixels, 'pixels_mapper').astype(jnp.float32), h.shape[1:3])
        h = h.astype(dt)

        level_outputs = []  # deepest first, as the up path takes them
        for i in range(levels):
            if i > 0:
                h = self._downscale(h, i)
            level_pass = self._level_pass(i, self.down_num_layers_per_block[i], f'down_blocks_{i}', False)
            repeats = self.down_blocks_repeat_mappers[i]
            h = self._run_level(h, level_pass, repeats, f'down_repeat_mappers_{i}', r_emb, clip, None, deterministic)
            level_outputs.insert(0, h)

        h = level_outputs[0]
        for u in range(levels):
            i = levels - 1 - u
            level_pass = self._level_pass(i, self.up_num_layers_per_block[u], f'up_blocks_{u}', u > 0)
            skip = level_outputs[u] if u > 0 else None
            repeats = self.up_blocks_repeat_mappers[u]
            h = self._run_level(h, level_pass, repeats, f'up_repeat_mappers_{u}', r_emb, clip, skip, deterministic)
            if i > 0:
                h = self._upscale(h, u, i)

        h = layers.layer_norm_2d(dt)(h)
        h = layers.conv(
            self.out_channels * p * p, (1, 1), dtype=dt, kernel_init=nn.initializers.zeros_init(), name='clf_1'
        )(h)
        return layers.pixel_shuffle(h, p).astype(jnp.float32)

    def _downscale(self, h: jax.Array, i: int) -> jax.Array:
        c, dt = self.block_out_channels[i], self.dtype
        if self.switch_level is None:
            return layers.downscale(h, c, dt, f'down_downscalers_{i}_1')
        h = layers.conv(c, (1, 1), dtype=dt, name=f'down_downscalers_{i}_1_blocks_0')(layers.layer_norm_2d(dt)(h))
        return _resize_to(h, (h.shape[1] // 2, h.shape[2] // 2)) if self.switch_level[i - 1] else h

    def _upscale(self, h: jax.Array, u: int, i: int) -> jax.Array:
        c, dt = self.block_out_channels[i - 1], self.dtype
        if self.switch_level is None:
            return layers.upscale(h, c, dt, f'up_upscalers_{u}_1')
        h = layers.layer_norm_2d(dt)(h)
        if self.switch_level[i - 1]:
            h = _resize_to(h, (h.shape[1] * 2, h.shape[2] * 2))
        return layers.conv(c, (1, 1), dtype=dt, name=f'up_upscalers_{u}_1_blocks_1')(h)
