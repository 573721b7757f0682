"""The schedule, loss weights and samplers: DDPM and DDIM against diffusers' schedulers, the Stable
Cascade sampler and CFG rescale against Stable Cascade's GDF (gdf/) and diffusers' rescale_noise_cfg."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMWuerstchenScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from torch_reference import step_noises
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
    import diffusers.schedulers.scheduling_ddpm_wuerstchen as ref_module

    ts = samplers.linspace_timesteps(12) if timesteps == 'linspace' else samplers.default_stage_c_timesteps()
    shape, rng = (2, 6, 5, 3), jax.random.key(3)
    x_init = np.array(jax.random.normal(jax.random.key(4), shape))
    ours = samplers.sample(_toy_eps, jnp.asarray(x_init), ts, rng, 'ddpm')

    # diffusers draws its noise with randn_tensor; feed it the noise our scan draws, step by step.
    noises = iter(map(torch.from_numpy, step_noises(rng, len(ts) - 1, shape)))
    monkeypatch.setattr(ref_module, 'randn_tensor', lambda *a, **k: next(noises))
    scheduler = ref_module.DDPMWuerstchenScheduler()
    scheduler.set_timesteps(timesteps=list(ts))
    x = torch.from_numpy(x_init)
    for t in scheduler.timesteps[:-1]:
        t_batch = t.expand(shape[0])
        eps = torch.from_numpy(np.array(_toy_eps(jnp.asarray(x.numpy()), jnp.asarray(t_batch.numpy()))))
        x = scheduler.step(eps, t_batch, x).prev_sample
    np.testing.assert_allclose(np.asarray(ours), x.numpy(), rtol=1e-4, atol=1e-5)


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


@pytest.mark.parametrize('spacing, steps, offset', [('trailing', 4, 0), ('leading', 10, 1)])
def test_ddim_chain_equals_diffusers(spacing, steps, offset):
    """DDIM (η = 0) against diffusers' DDIMScheduler whose betas give DDPMWuerstchenScheduler's cosine ᾱ
    on the grid t_k = k / 999 (train timestep k); its timesteps map to t_k, and its final step, to
    alphas_cumprod[0] (set_alpha_to_one=False), to t = 0."""
    grid = torch.linspace(0, 1, 1000)
    alpha_bar = DDPMWuerstchenScheduler()._alpha_cumprod(grid, 'cpu').double()
    betas = 1 - alpha_bar / torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        trained_betas=betas.numpy(),
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=offset,
        timestep_spacing=spacing,
    )
    scheduler.set_timesteps(steps)
    ts = np.append(scheduler.timesteps.numpy() / 999, 0.0).astype(np.float32)
    shape = (2, 6, 5, 3)
    x_init = np.array(jax.random.normal(jax.random.key(4), shape))
    ours = samplers.sample(_toy_eps, jnp.asarray(x_init), ts, jax.random.key(3), 'ddim')

    x = torch.from_numpy(x_init)
    for k, t in zip(scheduler.timesteps, ts):
        eps = torch.from_numpy(np.array(_toy_eps(jnp.asarray(x.numpy()), jnp.full((shape[0],), t))))
        x = scheduler.step(eps, int(k), x, eta=0.0).prev_sample
    np.testing.assert_allclose(np.asarray(ours), x.numpy(), rtol=1e-4, atol=1e-5)


# Per-sample conditions of _toy_model's CFG tests: the unconditional half sees zeros.
_CONDITIONS = np.array([[0.3, -0.2, 0.5], [-0.4, 0.1, 0.2]], np.float32)


def _toy_model(x, t, conditional):
    """A stand-in conditional network for sample_guided: conditional None is the [conditional;
    unconditional] doubled batch."""
    c = jnp.asarray(_CONDITIONS)
    c = c if conditional else jnp.concatenate([c, jnp.zeros_like(c)])
    return _toy_eps(x, t) + jnp.tanh(x) * c[:, None, None, :]


def _gdf_cfg(pred, pred_unconditional, cfg, cfg_rho):
    """GDF.sample's guidance and cfg_rho rescale (Stable Cascade gdf/__init__.py), line by line."""
    pred_cfg = torch.lerp(pred_unconditional, pred, cfg)
    if cfg_rho > 0:
        std_pos, std_cfg = pred.std(), pred_cfg.std()
        return cfg_rho * (pred_cfg * std_pos / (std_cfg + 1e-9)) + pred_cfg * (1 - cfg_rho)
    return pred_cfg


def _gdf_sample(model, x_init, noises, steps, cfg, cfg_rho, shift):
    """Stable Cascade's GDF.sample with the Stage C setup of train/train_c.py (CosineSchedule, VPScaler,
    EpsilonTarget, CosineTNoiseCond) and DDPMSampler, following gdf/ step by step; `noises` stand in
    for the sampler's torch.randn_like. model(x, t_cond) -> [conditional; unconditional] predictions."""
    s = torch.tensor([0.008])
    min_var = torch.cos(s / (1 + s) * torch.pi * 0.5) ** 2

    def schedule_log_snr(t, shift=1, limits=None):  # CosineSchedule.schedule inside BaseSchedule.__call__
        var = torch.cos((s + t.clamp(0, 1)) / (1 + s) * torch.pi * 0.5).clamp(0, 1) ** 2 / min_var
        var = var.clamp(0.0001, 0.9999)
        log_snr = (var / (1 - var)).log()
        if shift != 1:
            log_snr += 2 * np.log(1 / shift)
        return log_snr if limits is None else log_snr.clamp(*limits)

    def input_scaler(log_snr):  # VPScaler, viewed as B x 1 x 1 x 1
        a_squared = log_snr.sigmoid()
        return a_squared.sqrt().view(-1, 1, 1, 1), (1 - a_squared).sqrt().view(-1, 1, 1, 1)

    def noise_cond(log_snr):  # CosineTNoiseCond
        var = log_snr.sigmoid().clamp(0, 1)
        return ((var * min_var) ** 0.5).acos() / (torch.pi * 0.5) * (1 + s) - s

    limits = schedule_log_snr(torch.tensor([1.0, 0.0])).tolist()  # BaseSchedule.reset_limits at init
    r_range = torch.linspace(1.0, 0.0, steps + 1)
    log_snr_range = schedule_log_snr(r_range, shift=shift, limits=limits)[:, None].expand(-1, x_init.size(0))
    x = x_init.clone()
    for i in range(steps):
        pred, pred_unconditional = model(torch.cat([x, x]), noise_cond(log_snr_range[i]).repeat(2)).chunk(2)
        pred = _gdf_cfg(pred, pred_unconditional, cfg, cfg_rho)
        a, b = input_scaler(log_snr_range[i])
        x0, epsilon = (x - pred * b) / a, pred  # GDF.undiffuse, EpsilonTarget
        a_prev, b_prev = input_scaler(log_snr_range[i + 1])  # DDIMSampler.step with DDPMSampler's eta = 1
        sigma_tau = 1 * (b_prev**2 / b**2).sqrt() * (1 - a**2 / a_prev**2).sqrt()
        x = a_prev * x0 + (b_prev**2 - sigma_tau**2).sqrt() * epsilon + sigma_tau * next(noises)
    return x


@pytest.mark.parametrize('shift, cfg_rho', [(1.0, 0.0), (2.0, 0.7)])  # the latter: Stable Cascade's Stage C
def test_stable_cascade_chain_equals_gdf(shift, cfg_rho):
    """The 'stable_cascade' sampler with CFG (sample_guided, as the tasks run it) against GDF.sample on the
    same model and noise: logSNR shift, GDF's time input (0.9936 at t = 1 even unshifted), η = 1 noise on
    every step and the whole-batch cfg_rho rescale."""
    steps, shape, rng = 6, (2, 4, 3, 3), jax.random.key(5)
    x_init = np.array(jax.random.normal(jax.random.key(6), shape))
    ours = samplers.sample_guided(
        _toy_model, jnp.asarray(x_init), rng, samplers.linspace_timesteps(steps), 3.0, 'stable_cascade', shift, cfg_rho
    )

    def model(x, t):
        return torch.from_numpy(np.array(_toy_model(jnp.asarray(x.numpy()), jnp.asarray(t.numpy()), None)))

    noises = iter(map(torch.from_numpy, step_noises(rng, steps, shape)))
    expected = _gdf_sample(model, torch.from_numpy(x_init), noises, steps, 3.0, cfg_rho, shift)
    np.testing.assert_allclose(np.asarray(ours), expected.numpy(), rtol=1e-4, atol=1e-5)


def test_guidance_rescale_matches_gdf_and_diffusers():
    """CFG is diffusers' lerp; its rescale is GDF's cfg_rho, one std over the whole batch, which diffusers'
    per-sample rescale_noise_cfg equals on a batch of one (the pipeline samples each prompt alone)."""
    rng = np.random.default_rng(0)
    u, c = (rng.standard_normal((2, 4, 3, 5)).astype(np.float32) for _ in range(2))
    c[1] *= 3  # samples of different spread: a per-sample std would rescale differently
    ours = lambda w, rho, n=2: np.asarray(samplers.guidance(jnp.asarray(u[:n]), jnp.asarray(c[:n]), w, rho))
    tu, tc = torch.from_numpy(u), torch.from_numpy(c)
    np.testing.assert_allclose(ours(4.0, 0.0), torch.lerp(tu, tc, 4.0).numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours(4.0, 0.7), _gdf_cfg(tc, tu, 4.0, 0.7).numpy(), rtol=1e-5, atol=1e-6)
    per_sample = rescale_noise_cfg(torch.lerp(tu[:1], tc[:1], 4.0), tc[:1], 0.7)
    np.testing.assert_allclose(ours(4.0, 0.7, 1), per_sample.numpy(), rtol=1e-5, atol=1e-6)
