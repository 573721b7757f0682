"""The diffusion loss of the stages (ε- or v-prediction) and its deterministic held-out version."""

import jax
import jax.numpy as jnp

from wurst_jax.diffusion import schedule

EVAL_TIMES = (0.1, 0.25, 0.5, 0.75, 0.9)  # the fixed noise levels of the held-out loss


def epsilon_loss(
    eps_pred: jax.Array,
    noise: jax.Array,
    t: jax.Array,
    weighting: str,
    bucket_losses: jax.Array | None = None,
    p2_k: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """(weighted batch loss, raw per-sample MSE [B]): mean over (H, W, C) of (ε̂ − ε)², times the weight.
    For v-prediction pass v̂ and the v target (`schedule.v_target`) in place of ε̂ and ε."""
    raw = jnp.mean((eps_pred.astype(jnp.float32) - noise) ** 2, axis=tuple(range(1, noise.ndim)))
    weight = schedule.loss_weight(weighting, t, bucket_losses, p2_k)
    return jnp.mean(weight * raw), raw


def target(prediction: str, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """What the network learns to output: ε ('epsilon') or v ('v')."""
    return schedule.v_target(x0, noise, t) if prediction == 'v' else noise


def to_epsilon(prediction: str, out: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
    """The noise estimate the samplers take, from the network's output."""
    return schedule.epsilon_from_v(out, x_t, t) if prediction == 'v' else out


def fixed_time_losses(
    denoise, x0: jax.Array, seed: int = 0, times=EVAL_TIMES, add_noise=schedule.add_noise
) -> jax.Array:
    """Unweighted ε-MSE of `denoise(x_t, t) -> ε̂` at each of `times` with fixed noise: [len(times)].
    `add_noise(x0, noise, t)` is the process's forward noising (the cosine schedule's by default; a
    discrete process passes its integer steps as `times`)."""
    out = []
    for i, time in enumerate(times):
        noise = jax.random.normal(jax.random.fold_in(jax.random.key(seed), i), x0.shape, jnp.float32)
        t = jnp.full((x0.shape[0],), time, jnp.asarray(time).dtype)
        out.append(jnp.mean((denoise(add_noise(x0, noise, t), t) - noise) ** 2))
    return jnp.stack(out)
