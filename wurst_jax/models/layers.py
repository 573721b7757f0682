"""Building blocks shared by the wurst_jax networks (NHWC, Flax Linen).

Every Dense/Conv parameter carries logical axis names; `wurst_jax.sharding` maps
them onto the device mesh with the rules in the config. Logical names used:
  embed     the model width (channels) of a layer's input
  mlp       hidden width of an expanding layer
  conv_in   input channels of a convolution
  conv_out  output channels of a convolution
  vocab     rows of an embedding table or codebook
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Wuerstchen/Paella initialise every Conv/Linear with xavier_uniform and zero bias.
default_kernel_init = nn.initializers.xavier_uniform()


def dense(features: int, axes: tuple[str | None, str | None], *, use_bias: bool = True,
          dtype: Dtype = jnp.float32, kernel_init=default_kernel_init, name: str | None = None) -> nn.Dense:
    """A Dense layer whose kernel [in, out] and bias [out] carry logical axis names."""
    return nn.Dense(
        features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
        name=name)


def conv(features: int, kernel_size: Sequence[int], *, strides: int = 1, padding: Any = 'SAME',
         groups: int = 1, use_bias: bool = True, dtype: Dtype = jnp.float32,
         kernel_init=default_kernel_init, axes: tuple[str | None, str | None] = ('conv_in', 'conv_out'),
         name: str | None = None) -> nn.Conv:
    """A Conv layer, kernel [kh, kw, in/groups, out] annotated (None, None, *axes)."""
    return nn.Conv(
        features, tuple(kernel_size), strides=strides, padding=padding, feature_group_count=groups,
        use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(kernel_init, (None, None) + tuple(axes)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
        name=name)


def conv_transpose(features: int, kernel_size: Sequence[int], *, strides: int, torch_padding: int,
                   dtype: Dtype = jnp.float32, name: str | None = None) -> nn.ConvTranspose:
    """torch.nn.ConvTranspose2d(k, stride, padding=p) as a Flax ConvTranspose.

    torch's transposed conv is the gradient of a conv: flipped kernel and padding k - 1 - p
    on each side, which `transpose_kernel=True` and explicit padding reproduce.
    """
    pads = tuple((k - 1 - torch_padding, k - 1 - torch_padding) for k in kernel_size)
    return nn.ConvTranspose(
        features, tuple(kernel_size), strides=(strides, strides), padding=pads, transpose_kernel=True,
        dtype=dtype, param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(default_kernel_init, (None, None, 'conv_out', 'conv_in')),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ('conv_out',)),
        name=name)


def shard_batch(x: jax.Array) -> jax.Array:
    """Keeps activations split along the batch only: FSDP gathers weights, never activations."""
    return nn.with_logical_constraint(x, ('batch',) + (None,) * (x.ndim - 1))


def layer_norm_2d(dtype: Dtype = jnp.float32, name: str | None = None) -> nn.LayerNorm:
    """Würstchen's LayerNorm2d: normalise over channels, no affine parameters, eps 1e-6."""
    return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=dtype, name=name)


def pixel_unshuffle(x: jax.Array, factor: int) -> jax.Array:
    """torch.nn.PixelUnshuffle on NHWC: [B, H, W, C] -> [B, H/r, W/r, C*r*r], channel = c*r*r + i*r + j."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // factor, factor, w // factor, factor, c)
    x = x.transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, h // factor, w // factor, c * factor * factor)


def pixel_shuffle(x: jax.Array, factor: int) -> jax.Array:
    """torch.nn.PixelShuffle on NHWC: [B, H, W, C*r*r] -> [B, H*r, W*r, C], inverse of pixel_unshuffle."""
    b, h, w, crr = x.shape
    c = crr // (factor * factor)
    x = x.reshape(b, h, w, c, factor, factor)
    x = x.transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, h * factor, w * factor, c)
