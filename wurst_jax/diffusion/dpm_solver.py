"""DPM-Solver++ multistep, second order (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
Diffusion Probabilistic Models", Algorithm 2), the sampler of PixArt-α's diffusers pipeline.

Matches diffusers' `DPMSolverMultistepScheduler` (`src/diffusers/schedulers/scheduling_dpmsolver_multistep.py`)
with the configuration PixArt-alpha/PixArt-XL-2-1024-MS ships: algorithm_type 'dpmsolver++', solver_order 2,
solver_type 'midpoint', prediction_type 'epsilon', linear betas 1e-4..0.02 over 1000 steps, lower_order_final,
timestep_spacing 'linspace', steps_offset 0, no thresholding, no Karras/Lu sigmas, lambda_min_clipped −∞, and
final_sigmas_type left at its default 'zero' (the chain ends at σ = 0, i.e. on the data prediction itself).

In diffusers' σ = √((1 − ᾱ)/ᾱ) (so α_t = 1/√(σ² + 1), σ_t = σ·α_t, λ = −log σ), step i goes from σ_i to
σ_{i+1} with the data prediction m_i = (x − σ_t·ε̂)/α_t:
  first order   x ← (σ_{t,i+1}/σ_{t,i})·x + α_{i+1}·(1 − e^{−h})·m_i,        h = λ_{i+1} − λ_i
  second order  x ← (σ_{t,i+1}/σ_{t,i})·x + α_{i+1}·(1 − e^{−h})·(m_i + (m_i − m_{i−1})/(2r)),  r = (λ_i − λ_{i−1})/h
The first step is first order (no history). The last is first order when final_sigmas_type is 'zero' (always,
in diffusers), or with lower_order_final and fewer than 15 steps, or with euler_at_final.
The step coefficients depend only on the schedule, so they are computed once in float64 numpy.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def timesteps(num_inference_steps: int, num_train_steps: int = 1000) -> np.ndarray:
    """diffusers' 'linspace' timestep spacing (lambda_min_clipped −∞, so all num_train_steps are usable):
    round(linspace(0, T − 1, N + 1)) reversed, the final 0 dropped. [N] int64, descending."""
    grid = np.linspace(0, num_train_steps - 1, num_inference_steps + 1).round()
    return grid[::-1][:-1].astype(np.int64)


def _coefficients(
    alphas_cumprod: np.ndarray, ts: np.ndarray, final_sigmas_type: str, lower_order_final: bool, euler_at_final: bool
) -> dict[str, np.ndarray]:
    """Per-step [N] float64 arrays: alpha/sigma at the step's own σ (for m = (x − sigma·ε̂)/alpha) and
    x_next = a·x + b·m_i + c·m_{i−1}."""
    ac = np.asarray(alphas_cumprod, np.float64)
    sig_train = np.sqrt((1.0 - ac) / ac)
    if final_sigmas_type == 'zero':
        last = 0.0
    elif final_sigmas_type == 'sigma_min':
        last = sig_train[0]
    else:
        raise ValueError(f'final_sigmas_type must be zero or sigma_min, not {final_sigmas_type}')
    sig = np.append(sig_train[ts], last)
    alpha = 1.0 / np.sqrt(sig**2 + 1.0)
    sigma = sig * alpha
    n = len(ts)
    a, b, c = np.zeros(n), np.zeros(n), np.zeros(n)
    first_order_last = euler_at_final or (lower_order_final and n < 15) or final_sigmas_type == 'zero'
    for i in range(n):
        # e^{-h} = σ_{i+1}/σ_i in diffusers' σ; written without logs so that σ_{i+1} = 0 (h = ∞) is exact.
        phi = alpha[i + 1] * (1.0 - sig[i + 1] / sig[i])
        a[i] = sigma[i + 1] / sigma[i]
        if i == 0 or (i == n - 1 and first_order_last):
            b[i] = phi
        else:
            r = np.log(sig[i - 1] / sig[i]) / np.log(sig[i] / sig[i + 1])
            b[i] = phi * (1.0 + 0.5 / r)
            c[i] = -phi * 0.5 / r
    return {'alpha': alpha[:-1], 'sigma': sigma[:-1], 'a': a, 'b': b, 'c': c}


def sample(
    predict_eps: Callable[[jax.Array, jax.Array], jax.Array],
    x_init: jax.Array,
    alphas_cumprod: np.ndarray,
    timesteps: np.ndarray,
    final_sigmas_type: str = 'zero',
    lower_order_final: bool = True,
    euler_at_final: bool = False,
) -> jax.Array:
    """DPM-Solver++(2M) from x_init to x0, as one `lax.scan` over the N timesteps.

    predict_eps(x [B, ...], t [B] int32) -> ε̂ [B, ...] (the caller applies guidance and drops any variance
    channels); x_init [B, ...] is the noise at timesteps[0] (diffusers' init_noise_sigma is 1, so unscaled);
    alphas_cumprod [T] is the training schedule's ᾱ (concrete, e.g. `iddpm.linear_betas` cumulated, or a
    scheduler's); timesteps [N] int, descending (see `timesteps`). Returns x0 [B, ...] in x_init's dtype.
    """
    ts = np.asarray(timesteps, np.int64)
    co = _coefficients(alphas_cumprod, ts, final_sigmas_type, lower_order_final, euler_at_final)
    dtype = x_init.dtype
    xs = {k: jnp.asarray(v, dtype) for k, v in co.items()} | {'t': jnp.asarray(ts, jnp.int32)}
    batch = x_init.shape[0]

    def step(carry, s):
        x, m_prev = carry
        m = (x - s['sigma'] * predict_eps(x, jnp.full((batch,), s['t']))) / s['alpha']
        return (s['a'] * x + s['b'] * m + s['c'] * m_prev, m), None

    (x, _), _ = jax.lax.scan(step, (x_init, jnp.zeros_like(x_init)), xs)
    return x
