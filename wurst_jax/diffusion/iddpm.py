"""Improved DDPM (Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models") as PixArt-α
trains and samples it: integer timesteps 0..T-1, the linear β schedule, ε prediction with a learned-range
variance, and the hybrid loss L_simple + L_vb (paper §3.1).

Follows PixArt-alpha/PixArt-alpha `diffusion/iddpm.py`, `diffusion/model/gaussian_diffusion.py`,
`diffusion/model/respace.py` and `diffusion/model/diffusion_utils.py` (themselves from openai/improved-diffusion).
PixArt's training diffusion is `IDDPM('1000')` with its defaults: learn_sigma, ε prediction, loss type MSE
(not RESCALED_MSE, so the vb term is unscaled; RESCALED_MSE would multiply it by T/1000, which is 1 at T = 1000).
Its iDDPM sampling calls `p_sample_loop(..., clip_denoised=False)`.

Layout is NHWC: a model output holds 2C channels on the last axis, ε in the first C and the variance
interpolation values v ∈ [-1, 1] in the last C.

The schedule arrays are float64 numpy, built once; inside JAX they are read at the dtype of the data.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def linear_betas(num_steps: int = 1000) -> np.ndarray:
    """iDDPM's named 'linear' schedule: β from 1e-4 to 0.02 (Ho et al. 2020), both ends scaled by 1000/num_steps
    so the process stays comparable at any length. [num_steps] float64."""
    scale = 1000 / num_steps
    return np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)


class Schedule(NamedTuple):
    """The per-step arrays of a discrete diffusion process, each [S] float64 for its S steps.

    `timesteps` [S] int: the step of the original (training) process each step stands for, i.e. what the network
    is given as its time input; 0..S-1 for an unrespaced process.
    """

    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    # The posterior variance is 0 at t = 0, so its log there is taken from t = 1.
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray
    log_betas: np.ndarray
    timesteps: np.ndarray

    @property
    def num_steps(self) -> int:
        return int(self.betas.shape[0])


def make_schedule(betas: np.ndarray, timesteps: np.ndarray | None = None) -> Schedule:
    """The `Schedule` of a process with these betas ([S], 0 < β ≤ 1); `timesteps` defaults to 0..S-1."""
    betas = np.asarray(betas, dtype=np.float64)
    assert betas.ndim == 1 and betas.shape[0] > 1 and np.all(betas > 0) and np.all(betas <= 1)
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    return Schedule(
        betas=betas,
        alphas_cumprod=ac,
        alphas_cumprod_prev=ac_prev,
        sqrt_alphas_cumprod=np.sqrt(ac),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1.0),
        posterior_variance=post_var,
        posterior_log_variance_clipped=np.log(np.append(post_var[1], post_var[1:])),
        posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
        posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
        log_betas=np.log(betas),
        timesteps=np.arange(betas.shape[0]) if timesteps is None else np.asarray(timesteps),
    )


def space_timesteps(num_steps: int, section_counts: int | str | list[int]) -> np.ndarray:
    """The steps of a num_steps process that a respaced one keeps, ascending [sum(section_counts)] int64.

    iDDPM's `space_timesteps`: the process is cut into len(section_counts) near-equal sections and each section is
    strided (fractionally, rounded) to its count, both of its ends included. `section_counts` is an int, a list of
    ints, or a comma-separated string such as '100' or '10,15,20' (the 'ddimN' form is not supported).
    """
    if isinstance(section_counts, str):
        section_counts = [int(c) for c in section_counts.split(',')]
    elif isinstance(section_counts, int):
        section_counts = [section_counts]
    size_per, extra = divmod(num_steps, len(section_counts))
    start, kept = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f'cannot divide a section of {size} steps into {count}')
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        # Python's round (half to even), as iDDPM.
        kept += [start + round(j * stride) for j in range(count)]
        start += size
    return np.array(sorted(set(kept)), dtype=np.int64)


def respace(betas: np.ndarray, steps: int | str | list[int]) -> Schedule:
    """The process of `betas` ([T]) restricted to the steps `space_timesteps(T, steps)` keeps: new betas
    1 − ᾱ_k/ᾱ_(previous kept step), so ᾱ at each kept step is unchanged (iDDPM's SpacedDiffusion). The kept
    original steps are the result's `timesteps`."""
    base = make_schedule(betas)
    kept = space_timesteps(base.num_steps, steps)
    ac = base.alphas_cumprod[kept]
    new_betas = 1.0 - ac / np.append(1.0, ac[:-1])
    return make_schedule(new_betas, kept)


def _at(arr: np.ndarray, t: jax.Array, like: jax.Array) -> jax.Array:
    """arr[t] for t [B], shaped [B, 1, ..., 1] to broadcast against `like` [B, ...], in like's dtype."""
    return jnp.asarray(arr, like.dtype)[t].reshape((-1,) + (1,) * (like.ndim - 1))


def q_sample(sched: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t ~ q(x_t | x_0) = √ᾱ_t·x0 + √(1 − ᾱ_t)·noise. x0, noise [B, ...]; t [B] int."""
    return _at(sched.sqrt_alphas_cumprod, t, x0) * x0 + _at(sched.sqrt_one_minus_alphas_cumprod, t, x0) * noise


def q_posterior(sched: Schedule, x0: jax.Array, x_t: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eq. 6-7): (mean [B, ...], variance [B, 1, ...],
    clipped log variance [B, 1, ...])."""
    mean = _at(sched.posterior_mean_coef1, t, x_t) * x0 + _at(sched.posterior_mean_coef2, t, x_t) * x_t
    return mean, _at(sched.posterior_variance, t, x_t), _at(sched.posterior_log_variance_clipped, t, x_t)


def predict_x0(sched: Schedule, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    """x0 implied by ε: (x_t − √(1 − ᾱ_t)·ε)/√ᾱ_t, written as iDDPM does. [B, ...]."""
    return _at(sched.sqrt_recip_alphas_cumprod, t, x_t) * x_t - _at(sched.sqrt_recipm1_alphas_cumprod, t, x_t) * eps


def p_mean_variance(
    sched: Schedule, model_out: jax.Array, x_t: jax.Array, t: jax.Array, clip_x0: bool = False
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """p(x_{t-1} | x_t) from a learned-range ε model (iDDPM §3.1, eq. 15).

    model_out [B, H, W, 2C]: ε, then v ∈ [-1, 1]; x_t [B, H, W, C]; t [B] int (a step of `sched`).
    log σ² = f·log β_t + (1 − f)·posterior_log_variance_clipped_t with f = (v + 1)/2.
    Returns (mean [B, H, W, C], log variance [B, H, W, C], predicted x0 [B, H, W, C]); `clip_x0` clips the x0
    prediction to [-1, 1] before the mean (off, as PixArt samples latents).
    """
    eps, v = jnp.split(model_out, 2, axis=-1)
    frac = (v + 1) / 2
    log_var = frac * _at(sched.log_betas, t, x_t) + (1 - frac) * _at(sched.posterior_log_variance_clipped, t, x_t)
    x0 = predict_x0(sched, x_t, t, eps)
    if clip_x0:
        x0 = jnp.clip(x0, -1, 1)
    mean, _, _ = q_posterior(sched, x0, x_t, t)
    return mean, log_var, x0


def normal_kl(mean1: jax.Array, logvar1: jax.Array, mean2: jax.Array, logvar2: jax.Array) -> jax.Array:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise, in nats (broadcasting)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
    """Φ(x) by the tanh approximation iDDPM uses (the same as tanh-GELU's), not the exact erf."""
    return 0.5 * (1.0 + jnp.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: jax.Array, means: jax.Array, log_scales: jax.Array) -> jax.Array:
    """log P(x) in nats, elementwise, of x under N(means, e^(2·log_scales)) discretised to 256 bins of width 2/255
    on [-1, 1] (Ho et al. 2020 §3.3): the bin [x − 1/255, x + 1/255], widened to (−∞, ·] at x = −1 and
    [·, ∞) at x = 1. Probabilities are floored at 1e-12 before the log."""
    centered = x - means
    inv_std = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _mean_flat(x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def vb_terms_bpd(sched: Schedule, model_out: jax.Array, x0: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
    """The variational-bound term L_{t} in bits per dimension, [B]: at t = 0 the decoder NLL
    −log p(x0 | x1), otherwise KL(q(x_{t-1} | x_t, x0) ‖ p(x_{t-1} | x_t)). Shapes as `p_mean_variance`."""
    true_mean, _, true_log_var = q_posterior(sched, x0, x_t, t)
    mean, log_var, _ = p_mean_variance(sched, model_out, x_t, t)
    kl = _mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / np.log(2.0)
    nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)) / np.log(2.0)
    return jnp.where(t == 0, nll, kl)


def hybrid_loss(
    sched: Schedule,
    model_out: jax.Array,
    x0: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    noise: jax.Array,
    rescale_vb: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """iDDPM's hybrid loss L_simple + L_vb per sample (§3.1), as PixArt trains.

    model_out [B, H, W, 2C] is the network's output at (x_t, t); x0, x_t = q_sample(sched, x0, t, noise) and
    noise [B, H, W, C]; t [B] int. Returns (loss [B], {'mse': [B], 'vb': [B]}): mse is ‖ε − ε̂‖² averaged over
    non-batch axes, vb is `vb_terms_bpd` with ε̂ stop-gradiented so that the bound trains only the variance
    (iDDPM's `frozen_out`). `rescale_vb` is iDDPM's RESCALED_MSE (vb × T/1000); PixArt uses MSE (False).
    """
    eps, v = jnp.split(model_out, 2, axis=-1)
    frozen = jnp.concatenate([jax.lax.stop_gradient(eps), v], axis=-1)
    vb = vb_terms_bpd(sched, frozen, x0, x_t, t)
    if rescale_vb:
        vb = vb * (sched.num_steps / 1000.0)
    mse = _mean_flat((noise - eps) ** 2)
    return mse + vb, {'mse': mse, 'vb': vb}


def sample_t(rng: jax.Array, batch: int, num_steps: int = 1000) -> jax.Array:
    """Training timesteps, uniform on {0, ..., num_steps − 1}: [batch] int32."""
    return jax.random.randint(rng, (batch,), 0, num_steps)


def ancestral_sample(
    predict: Callable[[jax.Array, jax.Array], jax.Array],
    x_init: jax.Array,
    rng: jax.Array,
    sched: Schedule,
    noise: jax.Array | None = None,
    clip_x0: bool = False,
) -> jax.Array:
    """iDDPM's `p_sample_loop` with the learned variance, as one `lax.scan` over sched's S steps, last to first.

    predict(x [B, H, W, C], t [B] int32) -> [B, H, W, 2C] (ε, v); t is the ORIGINAL step `sched.timesteps[i]`
    (iDDPM's `_WrappedModel` mapping after respacing). x_init [B, H, W, C] is x at the last step, usually N(0, I).
    Step i draws x_{i-1} = mean + σ·z, with no noise at i = 0 (the mean is returned there). z is
    N(0, I) from fold_in(rng, i), or `noise[S − 1 − i]` when noise [S, B, H, W, C] is given (to replay another
    implementation's draws). Returns x0 [B, H, W, C].
    """
    steps = sched.num_steps
    model_t = jnp.asarray(sched.timesteps, jnp.int32)
    batch = x_init.shape[0]

    def step(x, k):
        i = steps - 1 - k
        t = jnp.full((batch,), i, jnp.int32)
        mean, log_var, _ = p_mean_variance(sched, predict(x, jnp.full((batch,), model_t[i])), x, t, clip_x0)
        z = jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype) if noise is None else noise[k]
        return mean + jnp.where(i > 0, jnp.exp(0.5 * log_var), 0.0).astype(x.dtype) * z, None

    x, _ = jax.lax.scan(step, x_init, jnp.arange(steps))
    return x
