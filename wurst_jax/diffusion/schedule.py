"""The cosine ᾱ(t) schedule on continuous t in [0, 1], t sampling, noising and loss weights.

Identical in Würstchen's Diffuzz (dome272/Wuerstchen `diffuzz.py`), diffusers' DDPMWuerstchenScheduler
(`scheduling_ddpm_wuerstchen.py`) and Stable Cascade's GDF (Stability-AI/StableCascade `gdf/schedulers.py`):
ᾱ(t) = cos²((t + s)/(1 + s)·π/2) / cos²(s/(1 + s)·π/2), clamped to [1e-4, 0.9999], s = 0.008.
The networks take t itself as their time input.
"""

import math

import jax
import jax.numpy as jnp

S = 0.008
ALPHA_MIN, ALPHA_MAX = 1e-4, 0.9999
LOGSNR_MAX = math.log(ALPHA_MAX / (1 - ALPHA_MAX))  # 9.21: the clamp in logSNR terms
LOSS_WEIGHTS = ('none', 'p2', 'adaptive')
PREDICTIONS = ('epsilon', 'v')  # what the network outputs: the noise, or v = √ᾱ·ε − √(1 − ᾱ)·x0
T_SAMPLING = ('wuerstchen', 'uniform')


def cosine_alpha_cumprod(t: jax.Array, s: float = S) -> jax.Array:
    """ᾱ(t), float32."""
    t = jnp.asarray(t, jnp.float32)
    start = math.cos(s / (1 + s) * math.pi / 2) ** 2
    return jnp.clip(jnp.cos((t + s) / (1 + s) * jnp.pi / 2) ** 2 / start, ALPHA_MIN, ALPHA_MAX)


def logsnr(t: jax.Array) -> jax.Array:
    a = cosine_alpha_cumprod(t)
    return jnp.log(a) - jnp.log1p(-a)


def t_from_logsnr(log_snr: jax.Array, s: float = S) -> jax.Array:
    """The t whose unclamped ᾱ has this logSNR (GDF's CosineTNoiseCond): the inverse of `logsnr`."""
    alpha = jax.nn.sigmoid(log_snr)
    start = math.cos(s / (1 + s) * math.pi / 2) ** 2
    return jnp.arccos(jnp.sqrt(jnp.clip(alpha * start, 0, 1))) / (jnp.pi / 2) * (1 + s) - s


def shifted_cosine_logsnr(t: jax.Array, image_size: int, base: float = 64.0, limit: float = 15.0) -> jax.Array:
    """Simple Diffusion's (Hoogeboom et al., 2023) resolution-shifted cosine logSNR at t in [0, 1]:
    −2·log tan(πt/2) + 2·log(base/image_size), clipped to [−limit, limit]. A larger image keeps more of
    its signal at a given noise level (neighbouring pixels average the noise out), so it is noised more."""
    # tan(π/2) in float32 is negative; 1 − 1e-5 is already past the clip for any shift below 7.
    t = jnp.clip(jnp.asarray(t, jnp.float32), 0.0, 1 - 1e-5)
    return jnp.clip(-2 * jnp.log(jnp.tan(jnp.pi * t / 2)) + 2 * math.log(base / image_size), -limit, limit)


def shifted_cosine_time(t: jax.Array, image_size: int, base: float = 64.0) -> jax.Array:
    """The time of this module's schedule whose ᾱ is the shifted schedule's at t, so that add_noise,
    v_target, epsilon_from_v and the samplers serve it unchanged (ᾱ keeps the module's clamp, |logSNR| ≤ 9.2)."""
    return t_from_logsnr(shifted_cosine_logsnr(t, image_size, base))


def sample_t(rng: jax.Array, batch: int, method: str = 'wuerstchen') -> jax.Array:
    """Training times [batch].

    'wuerstchen' (the official scripts): (1 - U)·1.08 + 0.001 clamped to [0.001, 1], so about 7.4 % of
    samples sit at t = 1, pure noise, which sampling starts from. 'uniform' (Stable Cascade, diffusers'
    fine-tuning script): (1 - U) + 0.001 clamped the same way.
    """
    u = jax.random.uniform(rng, (batch,))
    stretch = {'wuerstchen': 1.08, 'uniform': 1.0}[method]
    return jnp.clip((1 - u) * stretch + 0.001, 0.001, 1.0)


def add_noise(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = √ᾱ·x0 + √(1 - ᾱ)·ε, t [B]."""
    a = cosine_alpha_cumprod(t).reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise


def v_target(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """v = √ᾱ·ε − √(1 − ᾱ)·x0 (Salimans & Ho): ≈ −x0 at pure noise, so the layout a caption sets
    is what the high-noise steps are scored on, where ε-prediction scores it only by √SNR."""
    a = cosine_alpha_cumprod(t).reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.sqrt(a) * noise - jnp.sqrt(1 - a) * x0


def epsilon_from_v(v: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
    """ε = √(1 − ᾱ)·x_t + √ᾱ·v, the noise estimate the samplers take."""
    a = cosine_alpha_cumprod(t).reshape((-1,) + (1,) * (x_t.ndim - 1))
    return jnp.sqrt(1 - a) * x_t.astype(jnp.float32) + jnp.sqrt(a) * v.astype(jnp.float32)


def p2_weight(t: jax.Array, k: float = 1.0) -> jax.Array:
    """Choi et al.'s P2 weight 1/(k + SNR) (γ = 1). k = 1 is Diffuzz's and GDF's P2LossWeight, 1 − ᾱ(t).

    A smaller k raises the weight of the high-noise steps, up to 1/k, where the caption has to set the
    layout and the ε-MSE rewards it only by SNR times the x0 error; low-noise steps keep ≈ 1/SNR.
    """
    a = cosine_alpha_cumprod(t)
    return 1 / (k + a / (1 - a))


# Stable Cascade's AdaptiveLossWeight: the weight of a sample is 1 / (EMA of the raw loss in its logSNR
# bucket), so every noise level contributes equally. The bucket EMAs are training state.
ADAPTIVE_BUCKETS, ADAPTIVE_RANGE, ADAPTIVE_BETA = 300, 10.0, 0.99


def adaptive_init() -> jax.Array:
    return jnp.ones((ADAPTIVE_BUCKETS,), jnp.float32)


def _bucket(t: jax.Array) -> jax.Array:
    x = (jnp.clip(logsnr(t), -ADAPTIVE_RANGE, ADAPTIVE_RANGE) + ADAPTIVE_RANGE) / (2 * ADAPTIVE_RANGE)
    return jnp.clip((x * ADAPTIVE_BUCKETS).astype(jnp.int32), 0, ADAPTIVE_BUCKETS - 1)


def adaptive_weight(bucket_losses: jax.Array, t: jax.Array) -> jax.Array:
    return jnp.clip(1.0 / bucket_losses[_bucket(t)], 1e-7, 1e7)


def adaptive_update(bucket_losses: jax.Array, t: jax.Array, raw_loss: jax.Array) -> jax.Array:
    """EMA (β 0.99) of the mean raw per-sample loss of each bucket that has samples in this batch."""
    idx = _bucket(t)
    total = jax.ops.segment_sum(raw_loss, idx, ADAPTIVE_BUCKETS)
    count = jax.ops.segment_sum(jnp.ones_like(raw_loss), idx, ADAPTIVE_BUCKETS)
    mean = total / jnp.maximum(count, 1)
    updated = ADAPTIVE_BETA * bucket_losses + (1 - ADAPTIVE_BETA) * mean
    return jnp.where(count > 0, updated, bucket_losses)


def loss_weight(kind: str, t: jax.Array, bucket_losses: jax.Array | None = None, p2_k: float = 1.0) -> jax.Array:
    """Per-sample weight of the ε-MSE: 'none', 'p2' (with its k) or 'adaptive' (needs the bucket EMAs)."""
    if kind == 'none':
        return jnp.ones_like(t)
    if kind == 'p2':
        return p2_weight(t, p2_k)
    if kind == 'adaptive':
        return adaptive_weight(bucket_losses, t)
    raise ValueError(f'loss weight {kind!r} is not one of {LOSS_WEIGHTS}')
