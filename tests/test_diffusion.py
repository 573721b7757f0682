"""The schedule, loss weights and samplers, against diffusers' DDPMWuerstchenScheduler where it applies."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wurst_jax.diffusion import loss as diffusion_loss
from wurst_jax.diffusion import samplers, schedule


def test_cosine_schedule_values_and_clamps():
    t = jnp.array([0.0, 0.1, 0.5, 0.9, 1.0])
    a = np.asarray(schedule.cosine_alpha_cumprod(t))
    assert a[0] == pytest.approx(0.9999) and a[-1] == pytest.approx(1e-4)  # clamped at both ends
    assert np.all(np.diff(a) < 0)
    s = 0.008
    expected = np.cos((0.5 + s) / (1 + s) * np.pi / 2) ** 2 / np.cos(s / (1 + s) * np.pi / 2) ** 2
    assert a[2] == pytest.approx(expected, rel=1e-6)
    # t_from_logsnr inverts logsnr away from the clamps.
    mid = jnp.linspace(0.05, 0.95, 10)
    np.testing.assert_allclose(schedule.t_from_logsnr(schedule.logsnr(mid)), mid, atol=1e-5)


def test_t_sampling_puts_mass_at_pure_noise():
    t = np.asarray(schedule.sample_t(jax.random.key(0), 200_000, 'wuerstchen'))
    assert t.min() >= 0.001 and t.max() <= 1.0
    assert np.mean(t == 1.0) == pytest.approx(0.08 / 1.08, abs=0.005)  # (1.08 + 0.001 - 1) / 1.08
    uniform = np.asarray(schedule.sample_t(jax.random.key(0), 200_000, 'uniform'))
    assert np.mean(uniform == 1.0) < 0.002 and uniform.mean() == pytest.approx(0.5, abs=0.01)


def test_loss_weights():
    t = jnp.array([0.1, 0.5, 0.9])
    np.testing.assert_allclose(schedule.loss_weight('p2', t), 1 / (1 + jnp.exp(schedule.logsnr(t))), rtol=1e-5)
    np.testing.assert_allclose(schedule.loss_weight('p2', t), 1 - schedule.cosine_alpha_cumprod(t), rtol=1e-5)
    k = 0.05  # a smaller k lifts the high-noise weights towards 1/k and leaves the low-noise ones ~1/SNR
    np.testing.assert_allclose(schedule.loss_weight('p2', t, p2_k=k), 1 / (k + jnp.exp(schedule.logsnr(t))), rtol=1e-5)
    assert float(schedule.loss_weight('p2', jnp.array([1.0]), p2_k=k)[0]) > 0.99 / k
    np.testing.assert_array_equal(schedule.loss_weight('none', t), 1.0)
    buckets = schedule.adaptive_init()
    loss = jnp.array([4.0, 1.0, 0.25])
    for _ in range(2000):  # the EMA converges to each bucket's loss, so weighted losses become equal
        buckets = schedule.adaptive_update(buckets, t, loss)
    np.testing.assert_allclose(schedule.loss_weight('adaptive', t, buckets) * loss, 1.0, rtol=1e-3)
    with pytest.raises(ValueError, match='not one of'):
        schedule.loss_weight('snr', t)


def test_stage_c_timesteps():
    ts = samplers.default_stage_c_timesteps()
    assert len(ts) == 30 and ts[0] == 1.0 and ts[-1] == 0.0 and np.all(np.diff(ts) < 0)
    assert ts[19] == pytest.approx(2 / 3)


def _toy_eps(x, t):
    """A deterministic stand-in for a network: depends on x and t."""
    return 0.5 * x + t.reshape((-1,) + (1,) * (x.ndim - 1)) * 0.1


@pytest.mark.parametrize('timesteps', ['linspace', 'stage_c'])
def test_ddpm_chain_equals_diffusers(monkeypatch, timesteps):
    torch = pytest.importorskip('torch')
    import diffusers.schedulers.scheduling_ddpm_wuerstchen as ref_module
    ts = samplers.linspace_timesteps(12) if timesteps == 'linspace' else samplers.default_stage_c_timesteps()
    shape, rng = (2, 6, 5, 3), jax.random.key(3)
    x_init = np.array(jax.random.normal(jax.random.key(4), shape))
    ours = samplers.sample(_toy_eps, jnp.asarray(x_init), ts, rng, 'ddpm')

    # diffusers draws its noise with randn_tensor; feed it the noise our scan draws, step by step.
    keys = jax.random.split(rng, len(ts) - 1)
    noises = iter([torch.from_numpy(np.array(jax.random.normal(k, shape))) for k in keys])
    monkeypatch.setattr(ref_module, 'randn_tensor', lambda *a, **k: next(noises))
    scheduler = ref_module.DDPMWuerstchenScheduler()
    scheduler.set_timesteps(timesteps=list(ts))
    x = torch.from_numpy(x_init)
    for t in scheduler.timesteps[:-1]:
        t_batch = t.expand(shape[0])
        eps = torch.from_numpy(np.array(_toy_eps(jnp.asarray(x.numpy()), jnp.asarray(t_batch.numpy()))))
        x = scheduler.step(eps, t_batch, x).prev_sample
    np.testing.assert_allclose(np.asarray(ours), x.numpy(), rtol=1e-4, atol=1e-5)


def test_samplers_recover_a_point_mass():
    """With the exact ε of data concentrated at x0, every sampler lands on x0 (up to the √(1 - 0.9999)
    noise the clamp leaves at t = 0)."""
    x0 = jnp.full((1, 4, 4, 2), 0.7)

    def exact_eps(x, t):
        a = schedule.cosine_alpha_cumprod(t).reshape(-1, 1, 1, 1)
        return (x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)

    init = jax.random.normal(jax.random.key(0), x0.shape)
    for sampler, shift in [('ddpm', 1.0), ('ddim', 1.0), ('stable_cascade', 1.0), ('stable_cascade', 2.0)]:
        out = samplers.sample(exact_eps if shift == 1 else _shift_eps(x0, shift), init,
                              samplers.linspace_timesteps(20), jax.random.key(1), sampler, shift)
        np.testing.assert_allclose(out, x0, atol=5e-2, err_msg=f'{sampler} shift {shift}')


def test_v_prediction_converts_to_the_noise():
    """v = √ᾱ·ε − √(1 − ᾱ)·x0 and back: the exact v of x_t gives the exact ε, at every noise level."""
    rng = np.random.default_rng(0)
    x0, noise = (jnp.asarray(rng.standard_normal((5, 4, 4, 3)), jnp.float32) for _ in range(2))
    t = jnp.asarray([0.001, 0.2, 0.5, 0.9, 1.0])
    x_t = schedule.add_noise(x0, noise, t)
    v = diffusion_loss.target('v', x0, noise, t)
    np.testing.assert_allclose(diffusion_loss.to_epsilon('v', v, x_t, t), noise, atol=1e-5)
    np.testing.assert_allclose(v[-1], -x0[-1], atol=0.05)  # at t = 1, √ᾱ = 0.01: v is −x0 up to 0.01·ε
    assert diffusion_loss.target('epsilon', x0, noise, t) is noise


def _shift_eps(x0, shift):
    """Exact ε when the network's time input is the shifted t (the sampler maps it back to ᾱ)."""
    def eps(x, t_in):
        a = schedule.cosine_alpha_cumprod(t_in).reshape(-1, 1, 1, 1)
        return (x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
    return eps


def test_guidance():
    u, c = jnp.ones((2, 3)), jnp.array([[1.0, 2.0, 3.0], [0.0, 1.0, 2.0]])
    np.testing.assert_allclose(samplers.guidance(u, c, 1.0), c)
    np.testing.assert_allclose(samplers.guidance(u, c, 0.0), u)
    pred = samplers.guidance(u, c, 4.0)
    rescaled = samplers.guidance(u, c, 4.0, rescale=0.7)
    np.testing.assert_allclose(rescaled, 0.7 * pred * (c.std(1, keepdims=True) / pred.std(1, keepdims=True))
                               + 0.3 * pred, rtol=1e-6)
