"""PixArt-α's transformer (diffusers `PixArtTransformer2DModel`), NHWC (Chen et al., arXiv:2310.00426;
PixArt-alpha/PixArt-alpha `diffusion/model/nets/PixArt.py`, `PixArtMS.py`).

Patchify with fixed 2-D sin-cos positions (rescaled to the base grid, `interpolation_scale`); one
timestep MLP whose output `t_block` maps to six modulations shared by all blocks (adaLN-single),
each block adding its own `scale_shift_table`; per block gated self-attention, ungated
cross-attention to the text tokens (no norm: PixArt's quirk) and a gated GELU-tanh MLP; the T2I
final layer modulated by the raw timestep embedding. PixArtMS's size and aspect-ratio
micro-conditions are added to the timestep embedding when `use_additional_conditions`.
Names follow diffusers' modules, `blocks_i` for `transformer_blocks.i` (convert/pixart.py);
`scan_blocks` runs the blocks as one `nn.scan` over stacked params.

Time `t` is in the DDPM units of the reference (0..1000); Stage C passes 1000 · r.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from wurst_jax.models import layers

Dtype = Any


def sinusoid_frequencies(dim: int = 256, shift: int = 0) -> np.ndarray:
    """float32 frequencies of diffusers' `Timesteps(dim, downscale_freq_shift=shift)`, with the exponent
    rounded as torch rounds it and the exp correctly rounded: at t ~ 500 a last-bit difference in a
    frequency moves the angle by ~3e-5, more than a parity test allows."""
    half = dim // 2
    exponent = np.float32(-math.log(10000.0)) * np.arange(half, dtype=np.float32) / np.float32(half - shift)
    return layers.rounded_exp(exponent)


def timestep_embedding(t: jax.Array, dim: int = 256) -> jax.Array:
    """diffusers' `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`: [B] -> [B, dim] as [cos | sin]."""
    angles = t.astype(jnp.float32)[:, None] * sinusoid_frequencies(dim)[None]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class TimestepMLP(nn.Module):
    """diffusers' `TimestepEmbedding`: Linear - SiLU - Linear."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.normal(0.02)  # PixArt's init of the timestep MLP
        x = layers.dense(self.features, (None, 'embed'), dtype=self.dtype, kernel_init=init, name='linear_1')(x)
        return layers.dense(self.features, (None, 'embed'), dtype=self.dtype, kernel_init=init, name='linear_2')(
            nn.silu(x)
        )


class PixArtBlock(nn.Module):
    """diffusers' `BasicTransformerBlock` with norm_type='ada_norm_single'."""

    channels: int
    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, modulation: jax.Array, text: jax.Array, text_mask: jax.Array) -> jax.Array:
        """x: [B, N, D], modulation: [B, 6, D] (t_block's output), text: [B, L, D], text_mask: [B, L]."""
        table = self.param(
            'scale_shift_table',
            nn.with_logical_partitioning(nn.initializers.normal(self.channels**-0.5), (None, 'embed')),
            (6, self.channels),
        )
        mod = (table[None] + modulation).astype(self.dtype)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=1)
        h = layers.layer_norm_2d(self.dtype)(x) * (1 + scale_msa) + shift_msa
        x = x + gate_msa * layers.Attention(self.channels, self.num_heads, dtype=self.dtype, name='attn1')(h, h)
        # Cross-attention starts as the identity (PixArt's init zeroes its output projection).
        x = x + layers.Attention(self.channels, self.num_heads, dtype=self.dtype, zero_init_out=True, name='attn2')(
            x, text, mask=text_mask
        )
        h = layers.layer_norm_2d(self.dtype)(x) * (1 + scale_mlp) + shift_mlp
        h = layers.dense(4 * self.channels, ('embed', 'mlp'), dtype=self.dtype, name='ff_net_0')(h)
        h = layers.dense(self.channels, ('mlp', 'embed'), dtype=self.dtype, name='ff_net_2')(
            nn.gelu(h, approximate=True)
        )
        return layers.shard_batch(x + gate_mlp * h)


class PixArtScanStep(PixArtBlock):
    """PixArtBlock in nn.scan's (carry, xs) -> (carry, ys) form."""

    def __call__(self, x, modulation, text, text_mask):
        return super().__call__(x, modulation, text, text_mask), None


class PixArtTransformer(nn.Module):
    """x: [B, H, W, in_channels], t: [B] (0..1000), text: [B, L, caption_channels], text_mask: [B, L]
    -> [B, H, W, out_channels]; `resolution` [B, 2] (h, w) and `aspect_ratio` [B, 1] with
    use_additional_conditions."""

    in_channels: int = 4
    out_channels: int = 8
    num_heads: int = 16
    head_dim: int = 72
    depth: int = 28
    patch_size: int = 2
    sample_size: int = 128  # the latent size of the base grid that positions are scaled to
    interpolation_scale: float | None = None  # None: max(sample_size // 64, 1), as diffusers
    caption_channels: int | None = 4096  # None: text already has the model width
    use_additional_conditions: bool = False
    scan_blocks: bool = False
    remat_policy: str = 'none'
    dtype: Dtype = jnp.float32

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim

    def positions(self, grid_h: int, grid_w: int) -> jax.Array:
        """[grid_h * grid_w, D] sin-cos positions, rescaled to the base grid as diffusers' PatchEmbed."""
        base = self.sample_size // self.patch_size
        scale = self.interpolation_scale or max(self.sample_size // 64, 1)
        pos = layers.sincos_2d(grid_h, grid_w, self.width, (base / grid_h / scale, base / grid_w / scale))
        return pos.reshape(grid_h * grid_w, self.width)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        text: jax.Array,
        text_mask: jax.Array | None = None,
        resolution: jax.Array | None = None,
        aspect_ratio: jax.Array | None = None,
    ) -> jax.Array:
        b, h, w, _ = x.shape
        p, d = self.patch_size, self.width
        if h % p or w % p:
            raise ValueError(f'PixArt input {h}x{w} is not divisible by patch_size {p}')
        gh, gw = h // p, w // p
        tokens = layers.conv(
            d,
            (p, p),
            strides=p,
            padding='VALID',
            dtype=self.dtype,
            axes=(None, 'embed'),
            kernel_init=nn.initializers.xavier_uniform(),
            name='pos_embed_proj',
        )(x.astype(self.dtype))
        tokens = (tokens.reshape(b, gh * gw, d) + self.positions(gh, gw)[None]).astype(self.dtype)

        t_emb = TimestepMLP(d, self.dtype, name='timestep_embedder')(timestep_embedding(t).astype(self.dtype))
        if self.use_additional_conditions:
            if resolution is None or aspect_ratio is None:
                raise ValueError('use_additional_conditions needs resolution [B, 2] and aspect_ratio [B, 1]')
            size_mlp = lambda name: TimestepMLP(d // 3, self.dtype, name=name)
            res = size_mlp('resolution_embedder')(timestep_embedding(resolution.reshape(-1))).reshape(b, -1)
            ar = size_mlp('aspect_ratio_embedder')(timestep_embedding(aspect_ratio.reshape(-1))).reshape(b, -1)
            t_emb = t_emb + jnp.concatenate([res, ar], axis=-1).astype(t_emb.dtype)
        modulation = layers.dense(
            6 * d, ('embed', None), dtype=self.dtype, kernel_init=nn.initializers.normal(0.02), name='t_block'
        )(nn.silu(t_emb)).reshape(b, 6, d)

        if self.caption_channels is not None:
            init = nn.initializers.normal(0.02)
            text = layers.dense(
                d, (None, 'embed'), dtype=self.dtype, kernel_init=init, name='caption_projection_linear_1'
            )(text.astype(self.dtype))
            text = layers.dense(
                d, (None, 'embed'), dtype=self.dtype, kernel_init=init, name='caption_projection_linear_2'
            )(nn.gelu(text, approximate=True))
        text = text.astype(self.dtype)
        if text_mask is None:
            text_mask = jnp.ones(text.shape[:2], bool)

        block_args = dict(channels=d, num_heads=self.num_heads, dtype=self.dtype)
        if self.scan_blocks:
            scan = layers.scanned(PixArtScanStep, self.depth, 3, self.remat_policy)
            tokens, _ = scan(**block_args, name='blocks')(tokens, modulation, text, text_mask)
        else:
            block_cls = layers.remat(PixArtBlock, self.remat_policy)
            for k in range(self.depth):
                tokens = block_cls(**block_args, name=f'blocks_{k}')(tokens, modulation, text, text_mask)

        table = self.param(
            'scale_shift_table', nn.with_logical_partitioning(nn.initializers.normal(d**-0.5), (None, 'embed')), (2, d)
        )
        shift, scale = jnp.split((table[None] + t_emb[:, None]).astype(self.dtype), 2, axis=1)
        tokens = layers.layer_norm_2d(self.dtype)(tokens) * (1 + scale) + shift
        out = layers.dense(
            p * p * self.out_channels,
            ('embed', None),
            dtype=self.dtype,
            kernel_init=nn.initializers.zeros_init(),
            name='proj_out',
        )(tokens)
        out = out.reshape(b, gh, gw, p, p, self.out_channels).transpose(0, 1, 3, 2, 4, 5)
        return out.reshape(b, h, w, self.out_channels).astype(jnp.float32)
