"""CLIP text and vision towers (transformers' CLIPTextModel[WithProjection], CLIPVisionModelWithProjection).

Module names follow the transformers modules, so conversion (`wurst_jax/convert/clip.py`) is a
renaming: `layers_3` <-> `layers.3`, kernel/scale/embedding <-> weight. Which hidden state a
pipeline uses (diffusers `pipeline_wuerstchen_prior.py`, Stability-AI/StableCascade `train/train_c.py`):
Würstchen takes `last_hidden_state` (after the final LayerNorm), Stable Cascade `hidden_states[-1]`
(before it) and the pooled `text_embeds`.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wurst_jax.models import config_fields
from wurst_jax.models.layers import conv, dense

Dtype = Any

_LEGACY_EOS_TOKEN_ID = 2  # configs from before transformers PR #24773: pool at argmax(input_ids)


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's GELU approximation x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    'quick_gelu': quick_gelu,
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
}


def _layer_norm(eps: float, dtype: Dtype, name: str) -> nn.LayerNorm:
    # Two-pass variance as torch computes it; the default E[x^2] - E[x]^2 loses digits.
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=jnp.float32,
        use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (None,)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)),
        name=name,
    )


class CLIPAttention(nn.Module):
    """Self-attention with biased q/k/v/out projections; queries with no visible key output zeros."""

    hidden_size: int
    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        """x: [B, T, C], mask: bool [B, 1, T, T] (True = attend) or None -> [B, T, C]."""
        b, t, c = x.shape
        head_dim = c // self.num_heads
        split = lambda y: y.reshape(b, t, self.num_heads, head_dim)
        q = split(dense(c, ('embed', 'heads'), dtype=self.dtype, name='q_proj')(x))
        k = split(dense(c, ('embed', 'heads'), dtype=self.dtype, name='k_proj')(x))
        v = split(dense(c, ('embed', 'heads'), dtype=self.dtype, name='v_proj')(x))
        logits = jnp.einsum('btnh,bsnh->bnts', q, k).astype(jnp.float32) * head_dim**-0.5
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1)
        if mask is not None:
            # A left-padded query sees no key; torch's SDPA (transformers' default) gives it zeros.
            probs = jnp.where(mask.any(axis=-1, keepdims=True), probs, 0.0)
        out = jnp.einsum('bnts,bsnh->btnh', probs.astype(v.dtype), v).reshape(b, t, c)
        return dense(c, ('heads', 'embed'), dtype=self.dtype, name='out_proj')(out)


class CLIPMLP(nn.Module):
    hidden_size: int
    intermediate_size: int
    hidden_act: str
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = dense(self.intermediate_size, ('embed', 'mlp'), dtype=self.dtype, name='fc1')(x)
        h = ACTIVATIONS[self.hidden_act](h)
        return dense(self.hidden_size, ('mlp', 'embed'), dtype=self.dtype, name='fc2')(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN block: x + attn(LN1(x)), then x + mlp(LN2(x))."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    hidden_act: str
    layer_norm_eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        h = _layer_norm(self.layer_norm_eps, self.dtype, 'layer_norm1')(x)
        x = x + CLIPAttention(self.hidden_size, self.num_heads, self.dtype, name='self_attn')(h, mask)
        h = _layer_norm(self.layer_norm_eps, self.dtype, 'layer_norm2')(x)
        return x + CLIPMLP(self.hidden_size, self.intermediate_size, self.hidden_act, self.dtype, name='mlp')(h)


class CLIPEncoder(nn.Module):
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    hidden_act: str
    layer_norm_eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, ...]:
        """x: [B, T, C] -> (x, output of layer 0, ..., output of the last layer)."""
        states = [x]
        for i in range(self.num_layers):
            x = CLIPEncoderLayer(
                self.hidden_size,
                self.intermediate_size,
                self.num_heads,
                self.hidden_act,
                self.layer_norm_eps,
                self.dtype,
                name=f'layers_{i}',
            )(x, mask)
            states.append(x)
        return tuple(states)


def _encoder(tower: nn.Module) -> CLIPEncoder:
    """The `encoder` of a text or vision tower (called inside the tower's __call__, which it belongs to)."""
    return CLIPEncoder(
        tower.hidden_size,
        tower.intermediate_size,
        tower.num_hidden_layers,
        tower.num_attention_heads,
        tower.hidden_act,
        tower.layer_norm_eps,
        tower.dtype,
        name='encoder',
    )


def _check_activation(hidden_act: str) -> None:
    if hidden_act not in ACTIVATIONS:
        raise ValueError(f'hidden_act {hidden_act!r} is not supported: valid are {sorted(ACTIVATIONS)}')


class CLIPTextEmbeddings(nn.Module):
    vocab_size: int
    hidden_size: int
    max_position_embeddings: int

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        init = nn.initializers.normal(0.02)
        tokens = nn.Embed(
            self.vocab_size,
            self.hidden_size,
            param_dtype=jnp.float32,
            name='token_embedding',
            embedding_init=nn.with_logical_partitioning(init, ('vocab', 'embed')),
        )(input_ids)
        positions = nn.Embed(
            self.max_position_embeddings,
            self.hidden_size,
            param_dtype=jnp.float32,
            name='position_embedding',
            embedding_init=nn.with_logical_partitioning(init, (None, 'embed')),
        )
        return tokens + positions(jnp.arange(input_ids.shape[-1]))[None]


class CLIPTextModel(nn.Module):
    """transformers' CLIPTextModel (projection_dim None) or CLIPTextModelWithProjection."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = 'quick_gelu'
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = 512
    eos_token_id: int = 49407
    dtype: Dtype = jnp.float32

    @classmethod
    def from_hf_config(cls, cfg: dict, **overrides: Any) -> 'CLIPTextModel':
        """From a transformers CLIPTextConfig dict (whose defaults are the fields'); an `architectures` of
        CLIPTextModel means no projection."""
        fields = config_fields.read_fields(cls, cfg, skip=('dtype',))
        if (cfg.get('architectures') or ['CLIPTextModelWithProjection'])[0] == 'CLIPTextModel':
            fields['projection_dim'] = None
        return cls(**{**fields, **overrides})

    def hf_config(self) -> dict:
        """The transformers config.json fields (CLIPTextConfig) of this module."""
        cfg = dict(
            architectures=['CLIPTextModel' if self.projection_dim is None else 'CLIPTextModelWithProjection'],
            model_type='clip_text_model',
            **config_fields.write_fields(self, skip=('projection_dim', 'dtype')),
            attention_dropout=0.0,
        )
        if self.projection_dim is not None:
            cfg['projection_dim'] = self.projection_dim
        return cfg

    def _pool_index(self, input_ids: jax.Array) -> jax.Array:
        if self.eos_token_id == _LEGACY_EOS_TOKEN_ID:  # the EOS token had the largest id in the old vocab
            return jnp.argmax(input_ids, axis=-1)
        return jnp.argmax(input_ids == self.eos_token_id, axis=-1)  # first EOS (pad may equal EOS)

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> dict[str, Any]:
        """input_ids, attention_mask: int [B, L] -> dict of last_hidden_state [B, L, C], hidden_states
        (embeddings then each layer's output, [B, L, C] each), pooler_output [B, C], text_embeds [B, P]."""
        _check_activation(self.hidden_act)
        length = input_ids.shape[-1]
        x = CLIPTextEmbeddings(self.vocab_size, self.hidden_size, self.max_position_embeddings, name='embeddings')(
            input_ids
        ).astype(self.dtype)
        mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
        if attention_mask is not None:
            mask = mask & (attention_mask[:, None, None, :] != 0)
        states = _encoder(self)(x, mask)
        last = _layer_norm(self.layer_norm_eps, self.dtype, 'final_layer_norm')(states[-1])
        pooled = jnp.take_along_axis(last, self._pool_index(input_ids)[:, None, None], axis=1)[:, 0]
        out = {'last_hidden_state': last, 'hidden_states': states, 'pooler_output': pooled}
        if self.projection_dim is not None:
            out['text_embeds'] = dense(
                self.projection_dim, ('embed', None), use_bias=False, dtype=self.dtype, name='text_projection'
            )(pooled)
        return out


class CLIPVisionEmbeddings(nn.Module):
    hidden_size: int
    image_size: int
    patch_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        """images: [B, H, W, C] -> [B, 1 + (H // patch)^2, hidden] (class token first)."""
        b = images.shape[0]
        patches = conv(
            self.hidden_size,
            (self.patch_size, self.patch_size),
            strides=self.patch_size,
            padding='VALID',
            use_bias=False,
            dtype=self.dtype,
            axes=(None, 'embed'),
            kernel_init=nn.initializers.normal(0.02),
            name='patch_embedding',
        )(images)
        patches = patches.reshape(b, -1, self.hidden_size)
        cls_token = self.param(
            'class_embedding',
            nn.with_logical_partitioning(nn.initializers.normal(self.hidden_size**-0.5), ('embed',)),
            (self.hidden_size,),
        )
        x = jnp.concatenate(
            [jnp.broadcast_to(cls_token.astype(patches.dtype), (b, 1, self.hidden_size)), patches], axis=1
        )
        num_positions = (self.image_size // self.patch_size) ** 2 + 1
        positions = nn.Embed(
            num_positions,
            self.hidden_size,
            param_dtype=jnp.float32,
            name='position_embedding',
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, 'embed')),
        )
        return x + positions(jnp.arange(num_positions))[None].astype(x.dtype)


class CLIPVisionModel(nn.Module):
    """transformers' CLIPVisionModelWithProjection: ViT with a class token, pre- and post-LayerNorm."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    hidden_act: str = 'quick_gelu'
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    dtype: Dtype = jnp.float32

    @classmethod
    def from_hf_config(cls, cfg: dict, **overrides: Any) -> 'CLIPVisionModel':
        """From a transformers CLIPVisionConfig dict (whose defaults are the fields')."""
        return cls(**{**config_fields.read_fields(cls, cfg, skip=('dtype',)), **overrides})

    def hf_config(self) -> dict:
        """The transformers config.json fields (CLIPVisionConfig) of this module."""
        return dict(
            architectures=['CLIPVisionModelWithProjection'],
            model_type='clip_vision_model',
            **config_fields.write_fields(self, skip=('dtype',)),
            attention_dropout=0.0,
        )

    @nn.compact
    def __call__(self, images: jax.Array) -> dict[str, Any]:
        """images: [B, image_size, image_size, num_channels], normalised -> dict of last_hidden_state
        [B, 1 + patches, C], hidden_states, pooler_output [B, C] (post-LN class token), image_embeds [B, P]."""
        _check_activation(self.hidden_act)
        if images.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(
                f'images are {images.shape[1]}x{images.shape[2]}, the model expects {self.image_size}x{self.image_size}'
            )
        x = CLIPVisionEmbeddings(self.hidden_size, self.image_size, self.patch_size, self.dtype, name='embeddings')(
            images.astype(self.dtype)
        )
        x = _layer_norm(self.layer_norm_eps, self.dtype, 'pre_layrnorm')(x)  # transformers' spelling
        states = _encoder(self)(x, None)
        pooled = _layer_norm(self.layer_norm_eps, self.dtype, 'post_layernorm')(states[-1][:, 0])
        image_embeds = dense(
            self.projection_dim, ('embed', None), use_bias=False, dtype=self.dtype, name='visual_projection'
        )(pooled)
        return {
            'last_hidden_state': states[-1],
            'hidden_states': states,
            'pooler_output': pooled,
            'image_embeds': image_embeds,
        }
