"""Samplers on continuous t, each a `lax.scan` over (t, t_prev) pairs so a whole chain is one jit.

- 'ddpm': diffusers' DDPMWuerstchenScheduler / Diffuzz DDPMSampler.
- 'ddim': DDIM with η = 0.
- 'stable_cascade': GDF's sampler (DDIM with η = 1 in (a, b) form, noise on every step) with its
  logSNR `shift` and its time input, CosineTNoiseCond of the logSNR (Stable Cascade's gdf/).
Classifier-free guidance is ε̂ = ε̂_u + w·(ε̂_c − ε̂_u), optionally rescaled as GDF's cfg_rho does.
"""

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from wurst_jax.diffusion import schedule

SAMPLERS = ('ddpm', 'ddim', 'stable_cascade')


def linspace_timesteps(steps: int, t_start: float = 1.0) -> np.ndarray:
    """diffusers' default list: steps + 1 values from t_start down to 0 (steps model calls)."""
    return np.linspace(t_start, 0.0, steps + 1, dtype=np.float32)


def default_stage_c_timesteps() -> np.ndarray:
    """Würstchen v2's DEFAULT_STAGE_C_TIMESTEPS: 20 values dense at high noise, then 10 more: 29 steps."""
    return np.concatenate([np.linspace(1.0, 2 / 3, 20), np.linspace(2 / 3, 0.0, 11)[1:]]).astype(np.float32)


def guidance(eps_uncond: jax.Array, eps_cond: jax.Array, scale: float, rescale: float = 0.0) -> jax.Array:
    """CFG lerp; with rescale = ρ > 0, Stable Cascade's cfg_rho (gdf/__init__.py, GDF.sample):
    ρ·pred·std(cond)/(std(pred) + 1e-9) + (1 − ρ)·pred, each std over the whole batch as GDF takes it.
    diffusers' rescale_noise_cfg takes them per sample; the two agree on one sample, which is how the
    pipeline samples each prompt."""
    pred = eps_uncond + scale * (eps_cond - eps_uncond)
    if rescale > 0:
        pred = rescale * pred * jnp.std(eps_cond) / (jnp.std(pred) + 1e-9) + (1 - rescale) * pred
    return pred


def _shifted(t: jax.Array, shift: float, noise_cond: bool) -> tuple[jax.Array, jax.Array]:
    """(ᾱ, model time input) at t with the logSNR moved by 2·ln(1/shift) and clamped to the unshifted
    range (GDF's CosineSchedule); the time input is then GDF's CosineTNoiseCond, the t of that logSNR.
    Unshifted and without `noise_cond` (diffusers' schedulers) it is t itself. The two differ where ᾱ
    is clamped: GDF gives the model 0.9936 at t = 1."""
    if shift == 1 and not noise_cond:
        return schedule.cosine_alpha_cumprod(t), t
    log_snr = jnp.clip(schedule.logsnr(t) + 2 * math.log(1 / shift), -schedule.LOGSNR_MAX, schedule.LOGSNR_MAX)
    return jax.nn.sigmoid(log_snr), schedule.t_from_logsnr(log_snr)


def ddpm_step(
    x: jax.Array, eps: jax.Array, alpha_t: jax.Array, alpha_prev: jax.Array, last: jax.Array, noise: jax.Array
) -> jax.Array:
    """DDPMWuerstchenScheduler.step in terms of ᾱ(t) and ᾱ(t_prev); no noise on the step to t_prev = 0."""
    alpha = alpha_t / alpha_prev
    mu = jnp.sqrt(1 / alpha) * (x - (1 - alpha) * eps / jnp.sqrt(1 - alpha_t))
    std = jnp.sqrt((1 - alpha) * (1 - alpha_prev) / (1 - alpha_t))
    return mu + jnp.where(last, 0.0, std) * noise


def ddim_step(x: jax.Array, eps: jax.Array, alpha_t: jax.Array, alpha_prev: jax.Array) -> jax.Array:
    x0 = (x - jnp.sqrt(1 - alpha_t) * eps) / jnp.sqrt(alpha_t)
    return jnp.sqrt(alpha_prev) * x0 + jnp.sqrt(1 - alpha_prev) * eps


def stable_cascade_step(
    x: jax.Array, eps: jax.Array, alpha_t: jax.Array, alpha_prev: jax.Array, noise: jax.Array, eta: float = 1.0
) -> jax.Array:
    """GDF's DDPMSampler: a = √ᾱ, b = √(1 − ᾱ); σ = η·(b_prev/b)·√(1 − a²/a_prev²)."""
    a, b = jnp.sqrt(alpha_t), jnp.sqrt(1 - alpha_t)
    a_prev, b_prev = jnp.sqrt(alpha_prev), jnp.sqrt(1 - alpha_prev)
    x0 = (x - b * eps) / a
    sigma = eta * b_prev / b * jnp.sqrt(jnp.clip(1 - a**2 / a_prev**2, 0))
    return a_prev * x0 + jnp.sqrt(jnp.clip(b_prev**2 - sigma**2, 0)) * eps + sigma * noise


def sample(
    denoise: Callable[[jax.Array, jax.Array], jax.Array],
    x_init: jax.Array,
    timesteps,
    rng: jax.Array,
    sampler: str = 'ddpm',
    shift: float = 1.0,
) -> jax.Array:
    """Runs the chain from x_init at timesteps[0] down the list; `denoise(x, t[B]) -> ε̂` (with CFG inside).

    timesteps is a decreasing sequence (a NumPy array or list, static); len - 1 model calls.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f'sampler {sampler!r} is not one of {SAMPLERS}')
    ts = jnp.asarray(np.asarray(timesteps, np.float32))
    batch = x_init.shape[0]

    def body(x, inputs):
        t, t_prev, key = inputs
        alpha_t, t_in = _shifted(t, shift, sampler == 'stable_cascade')
        alpha_prev, _ = _shifted(t_prev, shift, sampler == 'stable_cascade')
        eps = denoise(x, jnp.full((batch,), t_in, jnp.float32)).astype(jnp.float32)
        noise = jax.random.normal(key, x.shape, jnp.float32)
        if sampler == 'ddpm':
            x = ddpm_step(x, eps, alpha_t, alpha_prev, t_prev == 0, noise)
        elif sampler == 'ddim':
            x = ddim_step(x, eps, alpha_t, alpha_prev)
        else:
            x = stable_cascade_step(x, eps, alpha_t, alpha_prev, noise)
        return x, None

    keys = jax.random.split(rng, len(ts) - 1)
    x, _ = jax.lax.scan(body, x_init.astype(jnp.float32), (ts[:-1], ts[1:], keys))
    return x


def sample_guided(
    denoise_cond,
    x_init: jax.Array,
    rng: jax.Array,
    timesteps,
    scale: float,
    sampler: str,
    shift: float = 1.0,
    rescale: float = 0.0,
) -> jax.Array:
    """Runs a sampler with classifier-free guidance; `denoise_cond(x, t, conditional: bool) -> ε̂`, at guidance `scale`.

    The conditional and unconditional passes share one call on a doubled batch.
    """
    if scale <= 1.0:
        return sample(lambda x, t: denoise_cond(x, t, True), x_init, timesteps, rng, sampler, shift)

    def denoise(x, t):
        eps_c, eps_u = jnp.split(denoise_cond(jnp.concatenate([x, x]), jnp.concatenate([t, t]), None), 2)
        return guidance(eps_u, eps_c, scale, rescale)

    return sample(denoise, x_init, timesteps, rng, sampler, shift)
