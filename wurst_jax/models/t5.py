"""T5 text encoder (transformers' T5EncoderModel): PixArt-α's frozen T5-v1.1-XXL.

The architecture of Raffel et al., "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer" (arXiv:1910.10683), with the numerics of transformers' `models/t5/modeling_t5.py`:
  - token embedding `shared` (not scaled, no absolute positions);
  - pre-norm blocks x + attn(norm(x)), x + ff(norm(x)), then a final norm; the norm is RMS-only (no mean
    subtraction, no bias) with the mean square taken in float32;
  - attention with no biases and no 1/sqrt(d_kv) scaling (folded into the init), plus a learned bias per
    head and relative-position bucket; the first block's table is computed once and added in every block;
  - feed-forward 'relu' (wi -> relu -> wo) or 'gated-gelu' (T5 v1.1: gelu_new(wi_0 x) * wi_1 x -> wo,
    gelu_new being the tanh approximation);
  - dropout off (inference).

Names follow transformers' modules, so conversion (`wurst_jax/convert/t5.py`) is a renaming:
`block_3/layer_0/SelfAttention/q/kernel` <-> `encoder.block.3.layer.0.SelfAttention.q.weight`. The one
exception is the relative-position table, which lives beside the blocks (`encoder/relative_attention_bias`,
file key `encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight`) so that every block has
the same params and `scan_blocks` can stack them.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from wurst_jax.models import config_fields, layers

Dtype = Any

# feed_forward_proj -> (gated, activation), as T5Config reads it ('gated-gelu' means gelu_new).
FEED_FORWARD = {'relu': (False, jax.nn.relu), 'gated-gelu': (True, lambda x: jax.nn.gelu(x, approximate=True))}
# T5Config's defaults (transformers `configuration_t5.py`: t5-small's) where they are not the fields' (XXL's).
_CONFIG_DEFAULTS = dict(d_model=512, d_ff=2048, num_layers=6, num_heads=8, feed_forward_proj='relu')
_NOT_IN_CONFIG = ('scan_blocks', 'remat_policy', 'dtype')  # this module's own settings


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """int32 [query_length, key_length]: the bidirectional bucket of key position - query position.

    Half the buckets for keys after the query; of each half, the first half are exact distances
    0 .. n/2 - 1, the rest log-spaced distances up to max_distance (beyond it: the last bucket).
    Computed with numpy at trace time (the lengths are static), in float32 as transformers does.
    """
    relative = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
    half = num_buckets // 2
    buckets = (relative > 0).astype(np.int64) * half
    distance = np.abs(relative)
    max_exact = half // 2
    with np.errstate(divide='ignore'):  # log(0) where the distance is exact anyway
        scaled = (
            np.log(distance.astype(np.float32) / np.float32(max_exact))
            / np.float32(math.log(max_distance / max_exact))
            * np.float32(half - max_exact)
        )
    large = max_exact + np.where(distance < max_exact, 0, scaled).astype(np.int64)
    buckets += np.where(distance < max_exact, distance, np.minimum(large, half - 1))
    return buckets.astype(np.int32)


class T5LayerNorm(nn.Module):
    """RMS norm: scale * x / sqrt(mean(x^2) + eps), the mean square in float32; output in `dtype`."""

    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            'scale', nn.with_logical_partitioning(nn.initializers.ones_init(), (None,)), (x.shape[-1],), jnp.float32
        )
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
        return (scale * x).astype(self.dtype)


class T5SelfAttention(nn.Module):
    """q/k/v/o without biases, logits q.k (unscaled) + position bias; keys outside the mask are dropped."""

    d_model: int
    d_kv: int
    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, position_bias: jax.Array, mask: jax.Array | None) -> jax.Array:
        """x: [B, L, d_model], position_bias: float32 [1, H, L, L], mask: bool [B, 1, 1, L] or None."""
        b, length, _ = x.shape
        inner = self.num_heads * self.d_kv
        normal = nn.initializers.normal

        def project(name, std):
            y = layers.dense(
                inner, ('embed', 'heads'), use_bias=False, dtype=self.dtype, kernel_init=normal(std), name=name
            )(x)
            return y.reshape(b, length, self.num_heads, self.d_kv)

        # transformers' T5 init: the query's std carries the 1/sqrt(d_kv) that the logits leave out.
        q = project('q', (self.d_model * self.d_kv) ** -0.5)
        k = project('k', self.d_model**-0.5)
        v = project('v', self.d_model**-0.5)
        logits = jnp.einsum('bqnd,bknd->bnqk', q, k).astype(jnp.float32) + position_bias
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum('bnqk,bknd->bqnd', probs, v).reshape(b, length, inner)
        return layers.dense(
            self.d_model,
            ('heads', 'embed'),
            use_bias=False,
            dtype=self.dtype,
            kernel_init=normal(inner**-0.5),
            name='o',
        )(out)


class T5FeedForward(nn.Module):
    """'relu': wo(relu(wi x)); 'gated-gelu': wo(gelu_new(wi_0 x) * wi_1 x)."""

    d_model: int
    d_ff: int
    feed_forward_proj: str = 'relu'
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gated, act = FEED_FORWARD[self.feed_forward_proj]
        dense = lambda features, axes, std, name: layers.dense(
            features, axes, use_bias=False, dtype=self.dtype, kernel_init=nn.initializers.normal(std), name=name
        )
        if gated:
            h = act(dense(self.d_ff, ('embed', 'mlp'), self.d_model**-0.5, 'wi_0')(x))
            h = h * dense(self.d_ff, ('embed', 'mlp'), self.d_model**-0.5, 'wi_1')(x)
        else:
            h = act(dense(self.d_ff, ('embed', 'mlp'), self.d_model**-0.5, 'wi')(x))
        return dense(self.d_model, ('mlp', 'embed'), self.d_ff**-0.5, 'wo')(h)


class T5LayerSelfAttention(nn.Module):
    """x + SelfAttention(layer_norm(x)): a block's `layer.0`."""

    d_model: int
    d_kv: int
    num_heads: int
    layer_norm_epsilon: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, position_bias: jax.Array, mask: jax.Array | None) -> jax.Array:
        h = T5LayerNorm(self.layer_norm_epsilon, self.dtype, name='layer_norm')(x)
        return x + T5SelfAttention(self.d_model, self.d_kv, self.num_heads, self.dtype, name='SelfAttention')(
            h, position_bias, mask
        )


class T5LayerFF(nn.Module):
    """x + DenseReluDense(layer_norm(x)): a block's `layer.1` (transformers' name for either feed-forward)."""

    d_model: int
    d_ff: int
    feed_forward_proj: str
    layer_norm_epsilon: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = T5LayerNorm(self.layer_norm_epsilon, self.dtype, name='layer_norm')(x)
        return x + T5FeedForward(self.d_model, self.d_ff, self.feed_forward_proj, self.dtype, name='DenseReluDense')(h)


class T5Block(nn.Module):
    d_model: int
    d_kv: int
    d_ff: int
    num_heads: int
    feed_forward_proj: str
    layer_norm_epsilon: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, position_bias: jax.Array, mask: jax.Array | None) -> jax.Array:
        x = T5LayerSelfAttention(
            self.d_model, self.d_kv, self.num_heads, self.layer_norm_epsilon, self.dtype, name='layer_0'
        )(x, position_bias, mask)
        return T5LayerFF(
            self.d_model, self.d_ff, self.feed_forward_proj, self.layer_norm_epsilon, self.dtype, name='layer_1'
        )(x)


class T5ScanStep(T5Block):
    """T5Block in nn.scan's (carry, xs) -> (carry, ys) form."""

    def __call__(self, x, position_bias, mask):
        return super().__call__(x, position_bias, mask), None


class T5Stack(nn.Module):
    """transformers' encoder T5Stack after the embedding: the position bias, the blocks, the final norm."""

    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    relative_attention_num_buckets: int
    relative_attention_max_distance: int
    feed_forward_proj: str
    layer_norm_epsilon: float
    scan_blocks: bool = False
    remat_policy: str = 'none'
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        length = x.shape[1]
        table = self.param(
            'relative_attention_bias',
            nn.with_logical_partitioning(nn.initializers.normal(self.d_model**-0.5), (None, None)),
            (self.relative_attention_num_buckets, self.num_heads),
            jnp.float32,
        )
        buckets = relative_position_buckets(
            length, length, self.relative_attention_num_buckets, self.relative_attention_max_distance
        )
        position_bias = jnp.take(table, jnp.asarray(buckets), axis=0).transpose(2, 0, 1)[None]  # [1, H, L, L]
        block_args = dict(
            d_model=self.d_model,
            d_kv=self.d_kv,
            d_ff=self.d_ff,
            num_heads=self.num_heads,
            feed_forward_proj=self.feed_forward_proj,
            layer_norm_epsilon=self.layer_norm_epsilon,
            dtype=self.dtype,
        )
        if self.scan_blocks:
            scan = layers.scanned(T5ScanStep, self.num_layers, 2, self.remat_policy)
            x, _ = scan(**block_args, name='block')(x, position_bias, mask)
        else:
            block_cls = layers.remat(T5Block, self.remat_policy)
            for i in range(self.num_layers):
                x = block_cls(**block_args, name=f'block_{i}')(x, position_bias, mask)
        return T5LayerNorm(self.layer_norm_epsilon, self.dtype, name='final_layer_norm')(x)


class T5Encoder(nn.Module):
    """transformers' T5EncoderModel: input_ids, attention_mask [B, L] -> last_hidden_state float32 [B, L, d_model].

    Fields are T5Config's (defaults: T5-v1.1-XXL, PixArt-α's text encoder), plus the compute `dtype`
    (params stay float32; the norms' mean square is float32 whatever it is), `scan_blocks` (the blocks as
    one nn.scan over stacked params, `block`) and `remat_policy` (layers.REMAT_POLICIES).
    """

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = 'gated-gelu'
    layer_norm_epsilon: float = 1e-6
    scan_blocks: bool = False
    remat_policy: str = 'none'
    dtype: Dtype = jnp.float32

    @classmethod
    def from_hf_config(cls, cfg: dict, **overrides: Any) -> 'T5Encoder':
        """From a transformers T5Config dict (config.json of a T5EncoderModel or T5ForConditionalGeneration)."""
        model_type = cfg.get('model_type', 't5')
        if model_type != 't5':
            raise ValueError(f"config model_type {model_type!r} is not a T5 config (model_type 't5')")
        fields = config_fields.read_fields(cls, cfg, skip=_NOT_IN_CONFIG, defaults=_CONFIG_DEFAULTS)
        _check_feed_forward(fields['feed_forward_proj'])
        return cls(**{**fields, **overrides})

    def hf_config(self) -> dict:
        """The transformers config.json fields (T5Config) of this module."""
        return dict(
            architectures=['T5EncoderModel'],
            model_type='t5',
            **config_fields.write_fields(self, skip=_NOT_IN_CONFIG),
            is_encoder_decoder=False,
            use_cache=False,
        )

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """input_ids: int [B, L], attention_mask: [B, L] (nonzero = a real token; None: all) -> float32 [B, L, D].

        The mask drops padded keys only; padded positions still get states (as in transformers)."""
        _check_feed_forward(self.feed_forward_proj)
        x = nn.Embed(
            self.vocab_size,
            self.d_model,
            param_dtype=jnp.float32,
            name='shared',
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), ('vocab', 'embed')),
        )(input_ids).astype(self.dtype)
        mask = None if attention_mask is None else (attention_mask != 0)[:, None, None, :]
        x = T5Stack(
            self.d_model,
            self.d_kv,
            self.d_ff,
            self.num_layers,
            self.num_heads,
            self.relative_attention_num_buckets,
            self.relative_attention_max_distance,
            self.feed_forward_proj,
            self.layer_norm_epsilon,
            self.scan_blocks,
            self.remat_policy,
            self.dtype,
            name='encoder',
        )(x, mask)
        return x.astype(jnp.float32)


def _check_feed_forward(feed_forward_proj: str) -> None:
    if feed_forward_proj not in FEED_FORWARD:
        raise ValueError(f'feed_forward_proj {feed_forward_proj!r} is not supported: valid are {sorted(FEED_FORWARD)}')
