"""Stage A: the Paella f4 VQGAN of Würstchen (diffusers `PaellaVQModel`) and its discriminator.

Layout follows dome272/Wuerstchen `vqgan.py` (`VQModel`): pixel unshuffle, mixing residual blocks, one stride-2 conv, a
BatchNorm'd 4-channel latent and a codebook with a straight-through estimator. Würstchen v2 and
Stable Cascade decode continuous latents; the codebook is used while training Stage A.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wurst_jax.models import layers

Dtype = Any


class MixingResBlock(nn.Module):
    """Paella's residual block: modulated LN -> depthwise 3x3 (replicate pad), modulated LN -> MLP."""

    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.channels
        x = layers.shard_batch(x)
        # Six scalar modulations, zero at init so the block starts as the identity.
        g = self.param('gammas', nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)), (6,))
        norm = layers.layer_norm_2d(self.dtype)
        t = norm(x) * (1 + g[0]) + g[1]
        t = layers.shard_batch(jnp.pad(t, ((0, 0), (1, 1), (1, 1), (0, 0)), mode='edge'))
        t = layers.DepthwiseConv(c, 3, 'VALID', self.dtype, name='depthwise')(t)
        x = x + layers.shard_batch(t) * g[2]
        t = norm(x) * (1 + g[3]) + g[4]
        t = layers.dense(4 * c, ('embed', 'mlp'), dtype=self.dtype, name='channelwise_0')(t)
        t = nn.gelu(t, approximate=False)
        t = layers.dense(c, ('mlp', 'embed'), dtype=self.dtype, name='channelwise_2')(t)
        return x + layers.shard_batch(t) * g[5]


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook with a straight-through gradient."""

    num_codes: int
    code_dim: int

    @nn.compact
    def __call__(self, z: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """z: [B, H, W, D] -> (quantised with straight-through grad, indices [B, H, W], vq_loss, commit_loss)."""
        # The latents are BatchNorm'd to unit variance; a codebook drawn from N(0, 1) starts where they
        # are. (Paella's U(-1/K, 1/K) start puts every code near 0, and most codes then never win.)
        codebook = self.param(
            'codebook',
            nn.with_logical_partitioning(nn.initializers.normal(1.0), ('vocab', None)),
            (self.num_codes, self.code_dim),
        )
        flat = z.reshape(-1, self.code_dim).astype(jnp.float32)
        dist = jnp.sum(flat**2, -1, keepdims=True) - 2 * flat @ codebook.T + jnp.sum(codebook**2, -1)[None]
        indices = jnp.argmin(dist, axis=-1)
        e = codebook[indices].reshape(z.shape)
        z32 = z.astype(jnp.float32)
        vq_loss = jnp.mean((jax.lax.stop_gradient(z32) - e) ** 2)
        commit_loss = jnp.mean((z32 - jax.lax.stop_gradient(e)) ** 2)
        quantised = z32 + jax.lax.stop_gradient(e - z32)
        return quantised.astype(z.dtype), indices.reshape(z.shape[:-1]), vq_loss, commit_loss


class VQGAN(nn.Module):
    """f4 VQGAN (diffusers `PaellaVQModel`). Latent h = BN(encoder(x)); Würstchen's Stage B works on
    h / scale_factor. Level widths are embed_dim / 2**i, the widest at the bottleneck.

    Submodule names follow the torch indices (down_blocks_<i>, up_blocks_<i>) so conversion is a
    table. The module is range-agnostic: our configs train on [-1, 1]; the released Würstchen
    weights expect [0, 1].
    """

    levels: int = 2
    embed_dim: int = 384
    bottleneck_blocks: int = 12
    latent_channels: int = 4
    num_codes: int = 8192
    scale_factor: float = 0.3764
    in_channels: int = 3
    out_channels: int = 3
    pixel_factor: int = 2
    dtype: Dtype = jnp.float32

    def setup(self):
        widths = [self.embed_dim // 2**i for i in reversed(range(self.levels))]
        dt = self.dtype
        self.in_conv = layers.conv(widths[0], (1, 1), dtype=dt)
        down = []
        for i, width in enumerate(widths):
            if i > 0:
                down.append(layers.conv(width, (4, 4), strides=2, padding=((1, 1), (1, 1)), dtype=dt))
            down.append(MixingResBlock(width, dt))
        self.down_blocks = down
        self.to_latent = layers.conv(self.latent_channels, (1, 1), use_bias=False, dtype=dt)
        self.latent_norm = layers.BatchNorm(epsilon=1e-5)  # torch's BatchNorm2d(c_latent)
        self.quantizer = VectorQuantizer(self.num_codes, self.latent_channels)
        self.from_latent = layers.conv(widths[-1], (1, 1), dtype=dt)
        up = []
        for i in range(self.levels):
            width = widths[self.levels - 1 - i]
            up.extend(MixingResBlock(width, dt) for _ in range(self.bottleneck_blocks if i == 0 else 1))
            if i < self.levels - 1:
                up.append(
                    layers.conv_transpose(widths[self.levels - 2 - i], (4, 4), strides=2, torch_padding=1, dtype=dt)
                )
        self.up_blocks = up
        self.out_conv = layers.conv(self.out_channels * self.pixel_factor**2, (1, 1), dtype=dt)

    def encode(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x: [B, H, W, 3] -> h: [B, H/f, W/f, latent_channels] (BN output, unscaled), f = 2 * 2**(levels-1)."""
        h = self.in_conv(layers.pixel_unshuffle(x.astype(self.dtype), self.pixel_factor))
        for block in self.down_blocks:
            h = block(h)
        h = self.to_latent(h)
        return self.latent_norm(h.astype(jnp.float32), use_running_average=not train)

    def quantize(self, h: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """h: [B, h, w, D] -> (quantised, indices, vq_loss, commit_loss)."""
        return self.quantizer(h)

    def decode(self, h: jax.Array) -> jax.Array:
        """h: [B, H/f, W/f, latent_channels] (continuous or quantised) -> image [B, H, W, 3]."""
        x = self.from_latent(h.astype(self.dtype))
        for block in self.up_blocks:
            x = block(x)
        return layers.pixel_shuffle(self.out_conv(x), self.pixel_factor).astype(jnp.float32)

    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Reconstruct through the codebook: x [B, H, W, 3] -> (recon [B, H, W, 3], aux losses and latents)."""
        h = self.encode(x, train)
        q, indices, vq_loss, commit_loss = self.quantize(h)
        return self.decode(q), dict(latent=h, indices=indices, vq_loss=vq_loss, commit_loss=commit_loss)


class Discriminator(nn.Module):
    """Patch discriminator of Würstchen's Stage A: spectral-norm 3x3 stride-2 convs -> 1x1 -> logits.

    Widths c_hidden/8 * 2**i capped at c_hidden (64, 128, 256, 512, 512, 512 for the reference);
    LeakyReLU(0.2) after every conv, InstanceNorm after all but the first. Returns logits (the
    sigmoid lives in the loss). Its kernels are not annotated: flax's SpectralNorm cannot wrap
    boxed params, and the discriminator is small enough to replicate.
    """

    c_hidden: int = 512
    depth: int = 6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x: [B, H, W, 3] -> logits [B, H / 2**depth, W / 2**depth, 1]."""
        x = x.astype(self.dtype)
        for i in range(self.depth):
            width = min(max(self.c_hidden // 8, 1) * 2**i, self.c_hidden)
            layer = nn.Conv(
                width,
                (3, 3),
                strides=2,
                padding=((1, 1), (1, 1)),
                dtype=self.dtype,
                kernel_init=layers.default_kernel_init,
            )
            x = nn.SpectralNorm(layer)(x, update_stats=train)
            if i > 0:
                x = nn.InstanceNorm(use_bias=False, use_scale=False, dtype=self.dtype)(x)
            x = nn.leaky_relu(x, 0.2)
        x = nn.Conv(1, (1, 1), dtype=self.dtype, kernel_init=layers.default_kernel_init, name='logits')(x)
        return x.astype(jnp.float32)
