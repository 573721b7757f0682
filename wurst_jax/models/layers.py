"""Building blocks shared by the wurst_jax networks (NHWC, Flax Linen).

Every Dense/Conv parameter carries logical axis names; `wurst_jax.sharding` maps
them onto the device mesh with the rules in the config. Logical names used:
  embed     the model width (channels) of a layer's input
  mlp       hidden width of an expanding layer
  conv_in   input channels of a convolution
  conv_out  output channels of a convolution
  vocab     rows of an embedding table or codebook
"""

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from wurst_jax.models import kernels

Dtype = Any
# config.dtype -> the compute dtype (params stay float32).
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

REMAT_POLICIES = {
    'none': None,  # keep every activation
    'full': jax.checkpoint_policies.nothing_saveable,  # recompute the whole block in the backward pass
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs only
}


def remat(block_cls: type[nn.Module], policy: str, *, deterministic_argnum: int | None = None) -> type[nn.Module]:
    """`block_cls` rematerialised with a REMAT_POLICIES policy ('none' returns it unchanged). Its
    params keep their names. `deterministic_argnum` (counting self) marks the Python-bool argument."""
    if policy == 'none':
        return block_cls
    static = () if deterministic_argnum is None else (deterministic_argnum,)
    return nn.remat(block_cls, policy=REMAT_POLICIES[policy], static_argnums=static)


def scanned(
    step_cls: type[nn.Module],
    length: int,
    num_broadcast: int,
    remat_policy: str = 'none',
    *,
    deterministic_argnum: int | None = None,
) -> type[nn.Module]:
    """`step_cls`, a block in nn.scan's (carry, *args) -> (carry, None) form, rematerialised (`remat`) and
    run `length` times over params stacked on a leading 'layers' axis. Every step draws its own params
    and dropout rng; the `num_broadcast` arguments after the carry are the same for every step."""
    return nn.scan(
        remat(step_cls, remat_policy, deterministic_argnum=deterministic_argnum),
        variable_axes={'params': 0},
        split_rngs={'params': True, 'dropout': True},
        length=length,
        in_axes=(nn.broadcast,) * num_broadcast,
        metadata_params={nn.PARTITION_NAME: 'layers'},
    )


# Wuerstchen/Paella initialise every Conv/Linear with xavier_uniform and zero bias.
default_kernel_init = nn.initializers.xavier_uniform()


def dense(
    features: int,
    axes: tuple[str | None, str | None],
    *,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    kernel_init=default_kernel_init,
    name: str | None = None,
) -> nn.Dense:
    """A Dense layer whose kernel [in, out] and bias [out] carry logical axis names."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
        name=name,
    )


def conv(
    features: int,
    kernel_size: Sequence[int],
    *,
    strides: int = 1,
    padding: Any = 'SAME',
    groups: int = 1,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    kernel_init=default_kernel_init,
    axes: tuple[str | None, str | None] = ('conv_in', 'conv_out'),
    name: str | None = None,
) -> nn.Conv:
    """A Conv layer, kernel [kh, kw, in/groups, out] annotated (None, None, *axes)."""
    return nn.Conv(
        features,
        tuple(kernel_size),
        strides=strides,
        padding=padding,
        feature_group_count=groups,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(kernel_init, (None, None) + tuple(axes)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
        name=name,
    )


class DepthwiseConv(nn.Module):
    """A stride-1 depthwise conv with nn.Conv(groups=features)'s params ('kernel' [k, k, m, C], 'bias'),
    replicated (9·m·C floats: activations never switch to a channel split); `padding` 'VALID' or
    ((top, bottom), (left, right)). The input may have m·C channels (torch's Conv2d(m·C, C, groups=C), as
    the Prior/Paella ResBlock's with a skip): output channel g then sums input channels g·m .. g·m + m - 1."""

    features: int
    kernel_size: int = 3
    padding: Any = 'VALID'
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, c = self.kernel_size, self.features
        if x.shape[-1] % c:
            raise ValueError(f'DepthwiseConv({c}) needs input channels divisible by {c}, got {x.shape[-1]}')
        m = x.shape[-1] // c
        kernel = self.param('kernel', nn.with_logical_partitioning(default_kernel_init, (None,) * 4), (k, k, m, c))
        bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)), (c,))
        x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
        padding = ((0, 0), (0, 0)) if self.padding == 'VALID' else tuple(map(tuple, self.padding))
        if kernels.depthwise_kernel() == 'grouped':
            out = jax.lax.conv_general_dilated(
                x, kernel, (1, 1), padding, feature_group_count=c, dimension_numbers=('NHWC', 'HWIO', 'NHWC')
            )
        else:  # group g's j-th input channel is channel g·m + j: one depthwise conv per j, summed
            x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
            out = sum(kernels.shifted_depthwise(x[..., j::m], kernel[:, :, j, :]) for j in range(m))
        return out + bias


class ConvTranspose(nn.Module):
    """torch.nn.ConvTranspose2d(k, stride, padding=p), with nn.ConvTranspose(transpose_kernel=True)'s
    params: 'kernel' [kh, kw, out, in], 'bias' [out].

    torch's transposed conv is the gradient of a conv: flipped kernel and padding k - 1 - p on each
    side, which lax.conv_transpose's `transpose_kernel=True` and explicit padding reproduce. The
    VQGAN's k=4, stride=2, p=1 runs as `kernels.phase_conv_transpose` where `kernels.conv_transpose_kernel`
    chooses it."""

    features: int
    kernel_size: tuple[int, int]
    strides: int
    torch_padding: int
    dtype: Dtype = jnp.float32
    kernel_init: Callable = default_kernel_init
    bias_init: Callable = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (*self.kernel_size, self.features, x.shape[-1])
        kernel = self.param(
            'kernel', nn.with_logical_partitioning(self.kernel_init, (None, None, 'conv_out', 'conv_in')), shape
        )
        bias = self.param('bias', nn.with_logical_partitioning(self.bias_init, ('conv_out',)), (self.features,))
        x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
        phases = self.kernel_size == (4, 4) and self.strides == 2 and self.torch_padding == 1
        if phases and kernels.conv_transpose_kernel() == 'phases':
            y = kernels.phase_conv_transpose(x, kernel)
        else:
            pads = tuple((k - 1 - self.torch_padding,) * 2 for k in self.kernel_size)
            y = jax.lax.conv_transpose(x, kernel, (self.strides,) * 2, pads, transpose_kernel=True)
        return y + bias


def conv_transpose(
    features: int,
    kernel_size: Sequence[int],
    *,
    strides: int,
    torch_padding: int,
    dtype: Dtype = jnp.float32,
    torch_default_init: bool = False,
    name: str | None = None,
) -> ConvTranspose:
    """`ConvTranspose` with xavier_uniform and a zero bias, or with `torch_default_init` ConvTranspose2d's
    own init (kaiming_uniform(a=√5), i.e. uniform ±1/√fan_in for kernel and bias, fan_in = out·kh·kw),
    which Paella keeps (its xavier init pass touches only Conv2d/Linear)."""
    kernel_init, bias_init = default_kernel_init, nn.initializers.zeros_init()
    if torch_default_init:
        kernel_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')
        receptive = int(np.prod(kernel_size))

        def bias_init(key, shape, dtype=jnp.float32):
            bound = 1 / math.sqrt(shape[0] * receptive)
            return jax.random.uniform(key, shape, dtype, -bound, bound)

    return ConvTranspose(features, tuple(kernel_size), strides, torch_padding, dtype, kernel_init, bias_init, name=name)


def shard_batch(x: jax.Array) -> jax.Array:
    """Keeps activations split along the batch only: FSDP gathers weights, never activations."""
    return nn.with_logical_constraint(x, ('batch',) + (None,) * (x.ndim - 1))


def layer_norm_2d(dtype: Dtype = jnp.float32, name: str | None = None) -> nn.LayerNorm:
    """Würstchen's LayerNorm2d: normalise over channels, no affine parameters, eps 1e-6."""
    return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=dtype, name=name)


class BatchNorm(nn.Module):
    """torch.nn.BatchNorm2d over the last (channel) axis, with nn.BatchNorm's variables ('scale' and 'bias'
    params, 'mean' and 'var' batch_stats), so converted weights and checkpoints load unchanged.

    In train mode (`use_running_average=False`) it normalises with the biased batch variance and moves the
    running statistics as torch does: stat = (1 - momentum) * stat + momentum * batch, the variance's from
    the unbiased batch variance (nn.BatchNorm takes the biased one, and the complementary momentum). The
    statistics are float32 means over all axes but the last, global under a batch-sharded jit.
    """

    momentum: float = 0.1  # torch's convention
    epsilon: float = 1e-5
    affine: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
        c = x.shape[-1]
        running_mean = self.variable('batch_stats', 'mean', jnp.zeros, (c,), jnp.float32)
        running_var = self.variable('batch_stats', 'var', jnp.ones, (c,), jnp.float32)
        x32 = x.astype(jnp.float32)
        if use_running_average:
            mean, var = running_mean.value, running_var.value
        else:
            n = x.size // c
            if n < 2:
                raise ValueError(f'BatchNorm in train mode needs more than one value per channel, got {x.shape}')
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x32, axes)
            var = jnp.mean(jnp.square(x32 - mean), axes)  # two passes, as torch: no E[x²] - E[x]² cancellation
            if not self.is_initializing():  # init leaves torch's starting statistics (0, 1)
                m = self.momentum
                running_mean.value = (1 - m) * running_mean.value + m * mean
                running_var.value = (1 - m) * running_var.value + m * var * (n / (n - 1))
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        if self.affine:
            replicated = lambda init: nn.with_logical_partitioning(init, (None,))
            y = y * self.param('scale', replicated(nn.initializers.ones_init()), (c,), jnp.float32) + self.param(
                'bias', replicated(nn.initializers.zeros_init()), (c,), jnp.float32
            )
        return y.astype(self.dtype)


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


def sincos_2d(height: int, width: int, dim: int, grid_scale: tuple[float, float] = (1.0, 1.0)) -> jax.Array:
    """Fixed 2-D sin-cos position embedding [height, width, dim], float32: the first half of the
    channels encodes the column, the second the row, each as [sin | cos] at 10000^(-k/(dim/4)).
    Positions are index x grid_scale (row, column): DiT/PixArt rescale the grid to a base size."""
    if dim % 4:
        raise ValueError(f'sincos_2d needs dim divisible by 4, got {dim}')
    omega = 1.0 / 10000 ** (jnp.arange(dim // 4, dtype=jnp.float32) / (dim // 4))

    def one_axis(pos):
        angles = pos[:, None] * omega[None]
        return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)

    cols = one_axis(jnp.arange(width, dtype=jnp.float32) * grid_scale[1])
    rows = one_axis(jnp.arange(height, dtype=jnp.float32) * grid_scale[0])
    return jnp.concatenate(
        [
            jnp.broadcast_to(cols[None], (height, width, dim // 2)),
            jnp.broadcast_to(rows[:, None], (height, width, dim // 2)),
        ],
        axis=-1,
    )


# ---------------------------------------------------------------------------------------------
# Würstchen diffusion blocks (dome272/Wuerstchen `modules.py`). Names follow the torch modules so conversion is
# a table: depthwise / channelwise_0 / grn / channelwise_4, mapper, kv_mapper, attention.


def rounded_exp(exponent: np.ndarray) -> np.ndarray:
    """exp of float32 exponents, correctly rounded to float32 (through float64). Sinusoidal embeddings
    take their frequencies from this, not jnp.exp, whose float32 polynomial is often a last bit off:
    at angles near 1e4 rad one ulp of a frequency moves the sine by up to ~5e-4. torch's CPU exp
    rounds correctly at about 99% of inputs."""
    return np.exp(np.asarray(exponent, np.float32).astype(np.float64)).astype(np.float32)


def gen_r_embedding(r: jax.Array, dim: int = 64, max_positions: int = 10000) -> jax.Array:
    """Würstchen's sinusoidal embedding of the continuous time r in [0, 1]: [B] -> [B, dim], float32
    (dome272/Wuerstchen, modules/wuerstchen.py `gen_r_embedding`).

    Always float32: r * 10000 reaches 1e4, where bfloat16 loses the high-frequency phases.
    """
    r = r.astype(jnp.float32) * max_positions
    half = dim // 2
    # The float32 exponent the torch reference computes: arange(half) times the step rounded to float32.
    freqs = rounded_exp(np.arange(half, dtype=np.float32) * np.float32(-math.log(max_positions) / (half - 1)))
    angles = r[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def cond_mapper(cond: jax.Array, features: int, dtype: Dtype = jnp.float32) -> jax.Array:
    """The Prior's `cond_mapper` (dome272/Wuerstchen `modules.py`): Linear -> LeakyReLU(0.2) -> Linear, the
    calling module's Dense `cond_mapper_0` and `cond_mapper_2`, normal(0.02) kernels (Würstchen's init of
    conditioning mappers)."""
    init = nn.initializers.normal(0.02)
    h = dense(features, (None, 'embed'), dtype=dtype, kernel_init=init, name='cond_mapper_0')(cond.astype(dtype))
    return dense(features, (None, 'embed'), dtype=dtype, kernel_init=init, name='cond_mapper_2')(nn.leaky_relu(h, 0.2))


def downscale(x: jax.Array, features: int, dtype: Dtype, name: str) -> jax.Array:
    """DiffNeXt's and Paella's step down between levels: LN2d, then the 2x2 stride-2 conv `name`."""
    x = layer_norm_2d(dtype)(x)
    return conv(features, (2, 2), strides=2, padding='VALID', dtype=dtype, name=name)(x)


def upscale(x: jax.Array, features: int, dtype: Dtype, name: str, *, torch_default_init: bool = False) -> jax.Array:
    """DiffNeXt's and Paella's step up between levels: LN2d, then the 2x2 stride-2 transposed conv `name`
    (`conv_transpose`'s `torch_default_init`: Paella's)."""
    x = layer_norm_2d(dtype)(x)
    return conv_transpose(
        features, (2, 2), strides=2, torch_padding=0, dtype=dtype, torch_default_init=torch_default_init, name=name
    )(x)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 GRN on [B, H, W, C]: identity at init (gamma = beta = 0)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        gamma = self.param('gamma', nn.with_logical_partitioning(nn.initializers.zeros_init(), ('mlp',)), (c,))
        beta = self.param('beta', nn.with_logical_partitioning(nn.initializers.zeros_init(), ('mlp',)), (c,))
        x32 = x.astype(jnp.float32)
        g = jnp.sqrt(jnp.sum(x32**2, axis=(1, 2), keepdims=True))
        n = g / (jnp.mean(g, axis=-1, keepdims=True) + 1e-6)
        return (gamma * (x32 * n) + beta + x32).astype(x.dtype)


class ResBlock(nn.Module):
    """ConvNeXt-style block: depthwise kxk -> LN2d -> [concat skip] -> Dense(4C) -> GELU -> GRN -> Dropout
    -> Dense(C), residual. The skip enters after the norm, as in Stage B (the prior passes none); with
    `skip_before_depthwise` it is concatenated to the input of the depthwise conv instead (C + C_skip -> C,
    groups C), as in the Prior/Paella `ResBlock` of dome272/Wuerstchen `modules.py`. `out_init_scale`
    multiplies the last Dense's initial kernel (Würstchen scales it by sqrt(1 / total blocks))."""

    channels: int
    dropout: float = 0.0
    kernel_size: int = 3
    dtype: Dtype = jnp.float32
    skip_before_depthwise: bool = False
    out_init_scale: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array, skip: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        c, k = self.channels, self.kernel_size
        x = shard_batch(x)
        h = x
        if skip is not None and self.skip_before_depthwise:
            h = jnp.concatenate([h, skip.astype(h.dtype)], axis=-1)
        h = DepthwiseConv(c, k, ((k // 2, k // 2),) * 2, self.dtype, name='depthwise')(h)
        h = layer_norm_2d(self.dtype)(shard_batch(h))
        if skip is not None and not self.skip_before_depthwise:
            h = jnp.concatenate([h, skip.astype(h.dtype)], axis=-1)
        h = dense(4 * c, ('embed', 'mlp'), dtype=self.dtype, name='channelwise_0')(h)
        h = GlobalResponseNorm(name='grn')(nn.gelu(h, approximate=False))
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        out_init = default_kernel_init
        if self.out_init_scale != 1.0:  # xavier_uniform times s: variance s² times xavier's
            out_init = nn.initializers.variance_scaling(self.out_init_scale**2, 'fan_avg', 'uniform')
        h = dense(c, ('mlp', 'embed'), dtype=self.dtype, kernel_init=out_init, name='channelwise_4')(h)
        return x + shard_batch(h)


class TimestepBlock(nn.Module):
    """FiLM by the time embedding: x * (1 + a) + b with (a, b) = Dense(2C)(r_emb).

    With `conds` (Stable Cascade's 'sca', 'crp'), r_emb is [emb(r), emb(cond_1), ...] side by side and
    each chunk has its own Dense (`mapper`, `mapper_{cond}`); their (a, b) are summed."""

    channels: int
    dtype: Dtype = jnp.float32
    conds: Sequence[str] = ()

    @nn.compact
    def __call__(self, x: jax.Array, r_emb: jax.Array) -> jax.Array:
        names = ['mapper'] + [f'mapper_{c}' for c in self.conds]
        ab = 0
        for name, chunk in zip(names, jnp.split(r_emb, len(names), axis=-1)):
            # Zero init for `mapper`: the modulation starts as the identity (Würstchen's init).
            init = nn.initializers.zeros_init() if name == 'mapper' else default_kernel_init
            ab = ab + dense(2 * self.channels, (None, 'embed'), dtype=self.dtype, kernel_init=init, name=name)(chunk)
        a, b = jnp.split(ab[:, None, None, :], 2, axis=-1)
        return x * (1 + a) + b


class Attention(nn.Module):
    """Multi-head attention with biases (torch MultiheadAttention / diffusers Attention): q from x, k/v from kv."""

    channels: int
    num_heads: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    zero_init_out: bool = False  # start as a no-op residual branch (PixArt's cross-attention)
    # q/k/v kernels drawn as torch.nn.MultiheadAttention draws its joint in_proj (xavier_uniform over
    # [3C, C], half the variance of xavier over each [C, C] block); False: xavier per kernel.
    mha_init: bool = False

    @nn.compact
    def __call__(
        self, x: jax.Array, kv: jax.Array, deterministic: bool = True, mask: jax.Array | None = None
    ) -> jax.Array:
        """x: [B, T, C], kv: [B, S, C'], mask: [B, S] (True/1 = attend) or None -> [B, T, C]."""
        c, heads = self.channels, self.num_heads
        split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, c // heads)
        qkv_init = nn.initializers.variance_scaling(0.5, 'fan_avg', 'uniform') if self.mha_init else default_kernel_init
        q = split(dense(c, ('embed', 'heads'), dtype=self.dtype, kernel_init=qkv_init, name='to_q')(x))
        k = split(dense(c, ('embed', 'heads'), dtype=self.dtype, kernel_init=qkv_init, name='to_k')(kv))
        v = split(dense(c, ('embed', 'heads'), dtype=self.dtype, kernel_init=qkv_init, name='to_v')(kv))
        mask = None if mask is None else mask.astype(bool)
        kernel = kernels.attention_kernel(self.dtype, c // heads)
        if kernel == 'blocked':
            out = kernels.blocked_attention(q, k, v, mask)
        elif kernel == 'cudnn':
            out = kernels.padded_attention(q, k, v, mask)
        elif kernel == 'dot_product_attention':
            out = jax.nn.dot_product_attention(q, k, v, mask=None if mask is None else mask[:, None, None, :])
        else:
            logits = jnp.einsum('btnh,bsnh->bnts', q, k) / jnp.sqrt(c // heads).astype(q.dtype)
            if mask is not None:
                logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(logits.dtype).min)
            probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
            out = jnp.einsum('bnts,bsnh->btnh', probs.astype(v.dtype), v)
        out = out.reshape(x.shape[0], x.shape[1], c)
        out_init = nn.initializers.zeros_init() if self.zero_init_out else default_kernel_init
        out = dense(c, ('heads', 'embed'), dtype=self.dtype, kernel_init=out_init, name='to_out')(out)
        # Dropout on the output projection, as diffusers' Attention (`to_out[1]`), not on the
        # probabilities as torch's MultiheadAttention: every kernel, the fused ones too, can train with it.
        return nn.Dropout(self.dropout)(out, deterministic=deterministic or self.dropout == 0)


class AttnBlock(nn.Module):
    """Self + cross attention in one softmax: keys = [LN2d(x) tokens, Dense(SiLU(cond))], residual."""

    channels: int
    num_heads: int
    self_attn: bool = True
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    mha_init: bool = False  # Attention.mha_init

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array, deterministic: bool = True) -> jax.Array:
        """x: [B, H, W, C], cond: [B, L, C_cond] -> [B, H, W, C]."""
        b, h, w, c = x.shape
        kv = dense(c, (None, 'embed'), dtype=self.dtype, name='kv_mapper')(nn.silu(cond))
        tokens = layer_norm_2d(self.dtype)(x).reshape(b, h * w, c)
        if self.self_attn:
            kv = jnp.concatenate([tokens, kv.astype(tokens.dtype)], axis=1)
        out = Attention(c, self.num_heads, self.dropout, self.dtype, mha_init=self.mha_init, name='attention')(
            tokens, kv, deterministic
        )
        return x + shard_batch(out.reshape(b, h, w, c))
