"""PixArt-α's diffusion: iDDPM's schedule, learned-range posterior, hybrid loss and ancestral sampler
(`wurst_jax.diffusion.iddpm`) against diffusers' DDPMScheduler and closed forms; DPM-Solver++(2M)
(`wurst_jax.diffusion.dpm_solver`) against diffusers' DPMSolverMultistepScheduler with PixArt's configuration.

JAX runs in float32 here; references run in float64 where diffusers allows it (DDPMScheduler with its ᾱ replaced
by a float64 one), in float32 where it does not (DPMSolverMultistepScheduler casts its σ to float32).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

from torch_reference import PIXART_DPM
from wurst_jax.diffusion import dpm_solver, iddpm

B, H, W, C = 2, 3, 4, 4


def to_nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(x, np.float64), -1, 1)))


def to_nhwc(x):
    return np.moveaxis(x.detach().numpy(), 1, -1)


def ddpm64(**kw):
    """DDPMScheduler for PixArt's betas, its ᾱ recomputed in float64 from float64 betas (diffusers' own
    formulas then run in float64, so a mismatch is one of semantics, not of float32 rounding)."""
    s = DDPMScheduler(beta_schedule='linear', beta_start=1e-4, beta_end=0.02, num_train_timesteps=1000, **kw)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    s.betas, s.alphas = betas, 1 - betas
    s.alphas_cumprod = torch.cumprod(1 - betas, 0)
    s.one = torch.tensor(1.0, dtype=torch.float64)
    return s


class ToyModel:
    """A fixed map x [.., C], t [B] -> (ε̂, v) [.., 2C], the same numbers in jax (NHWC) and torch (NCHW).

    ε̂ = √(1 − ᾱ_t)·x (the exact E[ε | x_t] when x0 ~ N(0, I)) plus a channel mixing and a bias scaled by √ᾱ_t,
    so that the implied x0 stays O(1) at every t; v = tanh(mixing + bias) in [-1, 1].
    """

    def __init__(self, seed=0, channels=C):
        r = np.random.default_rng(seed)
        self.w = r.normal(size=(channels, 2 * channels)) / np.sqrt(channels)
        self.b = r.normal(size=2 * channels)
        self.ac = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))

    @staticmethod
    def _out(x, w, b, a, t, xp):
        """x [B, H, W, C]; w, b, a (= ᾱ_t [B, 1, 1, 1]), t [B, 1, 1, 1] in x's dtype; xp: jnp or torch."""
        c, h = x.shape[-1], x @ w
        eps = xp.sqrt(1 - a) * x + xp.sqrt(a) * (0.3 * h[..., :c] + 0.1 * b[:c] * xp.sin(t / 100))
        return eps, xp.tanh(h[..., c:] + b[c:] * xp.cos(t / 300))

    def jax(self, x, t):
        f = lambda v: jnp.asarray(v, x.dtype)
        col = lambda v: v[:, None, None, None]
        return jnp.concatenate(self._out(x, f(self.w), f(self.b), col(f(self.ac)[t]), col(f(t)), jnp), axis=-1)

    def torch(self, x, t):
        f = lambda v: torch.as_tensor(v).to(x.dtype)
        col = lambda v: v[:, None, None, None]
        x = x.permute(0, 2, 3, 1)
        out = self._out(x, f(self.w), f(self.b), col(f(self.ac)[t]), col(f(t)), torch)
        return torch.cat(out, dim=-1).permute(0, 3, 1, 2)


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))) / np.max(np.abs(b)))


def test_linear_betas_and_alphas_cumprod_match_ddpm_scheduler():
    ref = DDPMScheduler(beta_schedule='linear', beta_start=1e-4, beta_end=0.02, num_train_timesteps=1000)
    betas = iddpm.linear_betas(1000)
    sched = iddpm.make_schedule(betas)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    # diffusers builds both in float32: β to within 2 ulp (torch's float32 linspace arithmetic), ᾱ (a 1000-term
    # float32 cumprod) to 1e-6.
    np.testing.assert_allclose(betas, ref.betas.numpy(), rtol=2.5e-7, atol=0)
    np.testing.assert_allclose(sched.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-6, atol=0)
    # Against diffusers' formula in float64: exact.
    np.testing.assert_allclose(sched.alphas_cumprod, ddpm64().alphas_cumprod.numpy(), rtol=1e-13, atol=0)
    # iDDPM's 'linear' keeps the process comparable at other lengths: both ends scale by 1000/T.
    short = iddpm.linear_betas(250)
    assert short[0] == pytest.approx(4e-4) and short[-1] == pytest.approx(0.08) and len(short) == 250


def test_learned_range_posterior_matches_ddpm_scheduler_step():
    ref = ddpm64(variance_type='learned_range', clip_sample=False)
    sched = iddpm.make_schedule(iddpm.linear_betas())
    rng = np.random.default_rng(1)
    for t in (0, 1, 7, 500, 999):
        x_t = rng.normal(size=(B, H, W, C))
        out = np.concatenate([rng.normal(size=(B, H, W, C)), rng.uniform(-1, 1, size=(B, H, W, C))], -1)
        g = torch.Generator().manual_seed(t)
        noise = torch.randn((B, C, H, W), generator=torch.Generator().manual_seed(t), dtype=torch.float64)
        prev, x0_ref = ref.step(to_nchw(out), t, to_nchw(x_t), generator=g, return_dict=False)

        tt = jnp.full((B,), t)
        mean, log_var, x0 = iddpm.p_mean_variance(
            sched, jnp.asarray(out, jnp.float32), jnp.asarray(x_t, jnp.float32), tt
        )
        np.testing.assert_allclose(x0, to_nhwc(x0_ref), rtol=2e-5, atol=2e-5 * np.abs(x0).max())
        if t == 0:
            # No noise is added at t = 0; diffusers' min log variance there is log(1e-20), iDDPM's the t = 1 one.
            np.testing.assert_allclose(mean, to_nhwc(prev), rtol=1e-5, atol=1e-5)
            continue
        # diffusers' sample = mean + exp(½·log σ²)·z with z drawn from the generator: replay z.
        ours = np.asarray(mean) + np.exp(0.5 * np.asarray(log_var)) * to_nhwc(noise)
        np.testing.assert_allclose(ours, to_nhwc(prev), rtol=1e-5, atol=1e-5)
        # The learned-range log variance, float64 on both sides.
        v64 = out[..., C:]
        ref_log_var = to_nhwc(ref._get_variance(t, predicted_variance=to_nchw(v64)))
        frac = (v64 + 1) / 2
        ours64 = frac * np.log(sched.betas[t]) + (1 - frac) * sched.posterior_log_variance_clipped[t]
        np.testing.assert_allclose(ours64, ref_log_var, rtol=1e-12, atol=0)
        np.testing.assert_allclose(log_var, ref_log_var, rtol=1e-6, atol=0)


def test_q_sample_and_posterior_closed_forms():
    sched = iddpm.make_schedule(iddpm.linear_betas())
    ac = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    rng = np.random.default_rng(2)
    x0, x_t, noise = (rng.normal(size=(B, H, W, C)) for _ in range(3))
    t = np.array([3, 640])
    a, a_prev = ac[t][:, None, None, None], ac[t - 1][:, None, None, None]
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    got = iddpm.q_sample(sched, f32(x0), jnp.asarray(t), f32(noise))
    np.testing.assert_allclose(got, np.sqrt(a) * x0 + np.sqrt(1 - a) * noise, rtol=1e-5, atol=1e-6)
    # Ho et al. 2020 eq. 7, with β_t = 1 − ᾱ_t/ᾱ_{t−1}.
    beta = 1 - a / a_prev
    want_mean = np.sqrt(a_prev) * beta / (1 - a) * x0 + np.sqrt(1 - beta) * (1 - a_prev) / (1 - a) * x_t
    mean, var, log_var = iddpm.q_posterior(sched, f32(x0), f32(x_t), jnp.asarray(t))
    np.testing.assert_allclose(mean, want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var[:, 0, 0, 0], ((1 - a_prev) / (1 - a) * beta).ravel(), rtol=1e-5)
    np.testing.assert_allclose(np.exp(log_var[:, 0, 0, 0]), var[:, 0, 0, 0], rtol=1e-5)


def test_space_timesteps_and_respace():
    # iDDPM's striding: 999/4 = 249.75 per step, rounded (499.5 to even).
    np.testing.assert_array_equal(iddpm.space_timesteps(1000, '5'), [0, 250, 500, 749, 999])
    np.testing.assert_array_equal(iddpm.space_timesteps(1000, 5), iddpm.space_timesteps(1000, [5]))
    np.testing.assert_array_equal(iddpm.space_timesteps(1000, '1000'), np.arange(1000))
    # Two sections of 50: [0, 49] in 2 and [50, 99] in 3.
    np.testing.assert_array_equal(iddpm.space_timesteps(100, '2,3'), [0, 49, 50, 74, 99])
    with pytest.raises(ValueError):
        iddpm.space_timesteps(10, 11)
    betas = iddpm.linear_betas()
    base, sp = iddpm.make_schedule(betas), iddpm.respace(betas, '100')
    assert sp.num_steps == 100 and sp.timesteps[0] == 0 and sp.timesteps[-1] == 999
    np.testing.assert_allclose(sp.alphas_cumprod, base.alphas_cumprod[sp.timesteps], rtol=1e-12)


def test_normal_kl_against_torch_distributions():
    rng = np.random.default_rng(3)
    m1, m2 = rng.normal(size=(2, 50))
    lv1, lv2 = rng.uniform(-8, 2, size=(2, 50))
    want = torch.distributions.kl_divergence(
        torch.distributions.Normal(torch.tensor(m1), torch.tensor(np.exp(0.5 * lv1))),
        torch.distributions.Normal(torch.tensor(m2), torch.tensor(np.exp(0.5 * lv2))),
    ).numpy()
    got = iddpm.normal_kl(*(jnp.asarray(a, jnp.float32) for a in (m1, lv1, m2, lv2)))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


def test_discretized_gaussian_log_likelihood_bins_and_edges():
    rng = np.random.default_rng(4)
    # Pixel values on the 256-level grid, both edges included.
    x = np.concatenate([[-1.0, 1.0, -1.0, 1.0], rng.integers(0, 256, size=60) / 127.5 - 1])
    log_scales = rng.uniform(np.log(0.005), np.log(0.3), size=x.shape)
    # Means within 2.5 scales: further out a bin's mass is a difference of two CDFs near 1 that float32
    # cannot resolve (iDDPM's float32 torch the same), and log P hits its 1e-12 floor.
    means = x + np.exp(log_scales) * np.clip(rng.normal(size=x.shape), -2.5, 2.5)
    # Edge bins with a mean inside [-1, 1] and a scale that leaves mass in the tail beyond.
    means[:4], log_scales[:4] = [-0.99, 0.99, -0.9, 0.95], np.log([0.02, 0.05, 0.1, 0.3])
    got = np.asarray(
        iddpm.discretized_gaussian_log_likelihood(*(jnp.asarray(a, jnp.float32) for a in (x, means, log_scales)))
    )

    # iDDPM's tanh approximation of Φ, float64.
    phi = lambda z: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))
    s = np.exp(log_scales)
    hi, lo = phi((x - means + 1 / 255) / s), phi((x - means - 1 / 255) / s)
    want = np.log(np.maximum(np.where(x < -0.999, hi, np.where(x > 0.999, 1 - lo, hi - lo)), 1e-12))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

    # The exact discretised Gaussian: bin masses agree to the approximation's error in Φ (about 1e-3).
    hi, lo = scipy.stats.norm.cdf(x - means + 1 / 255, scale=s), scipy.stats.norm.cdf(x - means - 1 / 255, scale=s)
    exact = np.where(x < -0.999, hi, np.where(x > 0.999, 1 - lo, hi - lo))
    np.testing.assert_allclose(np.exp(got), exact, atol=2e-3)
    # The edge bins take the whole tail, so hold more mass than a bin of width 2/255 would.
    assert np.all(np.exp(got[:4]) > (hi - lo)[:4])


def _vb_reference(x0, x_t, out, t, ac):
    """An independent float64 numpy L_vb (bits/dim) for ε-learned-range outputs, from ᾱ alone."""
    a, a_prev = ac[t], np.where(t > 0, ac[np.maximum(t - 1, 0)], 1.0)
    beta = 1 - a / a_prev
    post_var = beta * (1 - a_prev) / (1 - a)
    post_var_1 = (1 - ac[1] / ac[0]) * (1 - ac[0]) / (1 - ac[1])
    clipped_log = np.log(np.where(t == 0, post_var_1, post_var))
    e = lambda v: v[:, None, None, None]
    eps, v = out[..., :C], out[..., C:]
    x0_hat = (x_t - np.sqrt(1 - e(a)) * eps) / np.sqrt(e(a))
    c1, c2 = np.sqrt(a_prev) * beta / (1 - a), np.sqrt(1 - beta) * (1 - a_prev) / (1 - a)
    mu_q, mu_p = e(c1) * x0 + e(c2) * x_t, e(c1) * x0_hat + e(c2) * x_t
    frac = (v + 1) / 2
    log_var = frac * e(np.log(beta)) + (1 - frac) * e(clipped_log)
    var_q = e(np.exp(clipped_log))
    kl = np.log(np.sqrt(np.exp(log_var) / var_q)) + (var_q + (mu_q - mu_p) ** 2) / (2 * np.exp(log_var)) - 0.5
    s = np.exp(0.5 * log_var)
    phi = lambda z: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))
    hi, lo = phi((x0 - mu_p + 1 / 255) / s), phi((x0 - mu_p - 1 / 255) / s)
    p = np.where(x0 < -0.999, hi, np.where(x0 > 0.999, 1 - lo, hi - lo))
    nll = -np.log(np.maximum(p, 1e-12))
    per = lambda z: z.reshape(len(t), -1).mean(1) / np.log(2)
    return np.where(t == 0, per(nll), per(kl)), per(kl)


def test_hybrid_loss_terms_and_frozen_mean():
    sched = iddpm.make_schedule(iddpm.linear_betas())
    ac = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    rng = np.random.default_rng(5)
    t = np.array([0, 1, 300, 999])
    n = len(t)
    x0 = rng.integers(0, 256, size=(n, H, W, C)) / 127.5 - 1
    noise = rng.normal(size=(n, H, W, C))
    x_t = np.asarray(
        iddpm.q_sample(sched, jnp.asarray(x0, jnp.float32), jnp.asarray(t), jnp.asarray(noise, jnp.float32))
    )
    # An ε̂ near the true noise, so the decoder NLL at t = 0 stays finite and away from its floor.
    out = np.concatenate([noise + 0.02 * rng.normal(size=noise.shape), rng.uniform(-1, 1, size=noise.shape)], -1)
    f32 = lambda a: jnp.asarray(a, jnp.float32)

    loss, terms = iddpm.hybrid_loss(sched, f32(out), f32(x0), f32(x_t), jnp.asarray(t), f32(noise))
    np.testing.assert_allclose(terms['mse'], ((noise - out[..., :C]) ** 2).reshape(n, -1).mean(1), rtol=1e-5)
    want_vb, kl_everywhere = _vb_reference(x0, x_t.astype(np.float64), out, t, ac)
    # float32 x_t at t = 999 carries 1e-7 of relative error into x0 = x_t/√ᾱ (√ᾱ ≈ 6e-3): the KL's
    # (μ_q − μ_p)² term amplifies it: 5e-4 relative at t = 300, and at t = 999 (a KL of 5e-6 bits) 3e-3
    # relative, within the 1e-5 absolute.
    np.testing.assert_allclose(terms['vb'], want_vb, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(loss, terms['mse'] + terms['vb'], rtol=1e-6)
    # t = 0 takes the decoder NLL, not the KL.
    assert abs(float(terms['vb'][0]) - kl_everywhere[0]) > 1e-2 * abs(kl_everywhere[0])
    # RESCALED_MSE's factor is T/1000 = 1 here.
    np.testing.assert_allclose(
        iddpm.hybrid_loss(sched, f32(out), f32(x0), f32(x_t), jnp.asarray(t), f32(noise), True)[0], loss
    )

    # The vb term trains only the variance half; the mse only the ε half.
    grad = lambda key: jax.grad(
        lambda o: iddpm.hybrid_loss(sched, o, f32(x0), f32(x_t), jnp.asarray(t), f32(noise))[1][key].sum()
    )(f32(out))
    g_vb, g_mse = np.asarray(grad('vb')), np.asarray(grad('mse'))
    assert np.all(g_vb[..., :C] == 0) and np.abs(g_vb[..., C:]).max() > 1e-4
    assert np.all(g_mse[..., C:] == 0)
    np.testing.assert_allclose(g_mse[..., :C], -2 * (noise - out[..., :C]) / (H * W * C), rtol=1e-4, atol=1e-7)


def test_sample_t_is_uniform_integers():
    t = np.asarray(iddpm.sample_t(jax.random.key(0), 20000, 1000))
    assert t.shape == (20000,) and t.min() == 0 and t.max() == 999 and np.issubdtype(t.dtype, np.integer)
    counts = np.bincount(t // 100, minlength=10)
    assert np.all(np.abs(counts - 2000) < 5 * np.sqrt(2000))


def test_ancestral_sample_matches_ddpm_scheduler_loop_respaced():
    betas = iddpm.linear_betas()
    sp = iddpm.respace(betas, '5')
    model = ToyModel(seed=6)
    ref = ddpm64(variance_type='learned_range', clip_sample=False)
    ref.set_timesteps(timesteps=sp.timesteps[::-1].tolist())
    x_init = np.random.default_rng(7).normal(size=(B, H, W, C))

    # diffusers draws one z per step with t > 0 from the generator: replay those draws for ours.
    g, replay = torch.Generator().manual_seed(8), torch.Generator().manual_seed(8)
    noises = [to_nhwc(torch.randn((B, C, H, W), generator=replay, dtype=torch.float64)) for _ in ref.timesteps[:-1]]
    # diffusers adds nothing at t = 0; a nonzero z there checks that ours does not either.
    noises.append(np.random.default_rng(9).normal(size=x_init.shape))
    x = to_nchw(x_init)
    for t in ref.timesteps:
        x = ref.step(model.torch(x, t.expand(B)), t, x, generator=g).prev_sample
    want = to_nhwc(x)

    got = iddpm.ancestral_sample(
        model.jax,
        jnp.asarray(x_init, jnp.float32),
        jax.random.key(0),
        sp,
        noise=jnp.asarray(np.stack(noises), jnp.float32),
    )
    assert rel_err(got, want) < 1e-5, rel_err(got, want)

    # The model is given the original timesteps, last first.
    seen = []

    def predict(x, t):
        jax.debug.callback(lambda t: seen.append(np.asarray(t)), t)
        return model.jax(x, t)

    iddpm.ancestral_sample(predict, jnp.asarray(x_init, jnp.float32), jax.random.key(0), sp)
    np.testing.assert_array_equal(np.stack(seen), np.repeat(sp.timesteps[::-1, None], B, 1))
    # With its own noise the chain is reproducible and differs between keys.
    a = iddpm.ancestral_sample(model.jax, jnp.asarray(x_init, jnp.float32), jax.random.key(1), sp)
    b = iddpm.ancestral_sample(model.jax, jnp.asarray(x_init, jnp.float32), jax.random.key(1), sp)
    c = iddpm.ancestral_sample(model.jax, jnp.asarray(x_init, jnp.float32), jax.random.key(2), sp)
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3


def _dpm_reference(model, x_init, steps, **kw):
    ref = DPMSolverMultistepScheduler(**(PIXART_DPM | kw))
    ref.set_timesteps(steps)
    x = torch.from_numpy(np.moveaxis(x_init, -1, 1).copy())
    for t in ref.timesteps:
        eps = model.torch(x, t.expand(B))[:, :C]
        x = ref.step(eps, t, x).prev_sample
    return ref, np.moveaxis(x.numpy(), 1, -1)


@pytest.mark.parametrize('steps,final_sigmas_type', [(20, 'zero'), (10, 'zero'), (20, 'sigma_min'), (10, 'sigma_min')])
def test_dpm_solver_matches_diffusers(steps, final_sigmas_type):
    model = ToyModel(seed=9)
    x_init = np.random.default_rng(10).normal(size=(B, H, W, C)).astype(np.float32)
    ref, want = _dpm_reference(model, x_init, steps, final_sigmas_type=final_sigmas_type)
    ts = dpm_solver.timesteps(steps)
    np.testing.assert_array_equal(ts, ref.timesteps.numpy())
    predict = lambda x, t: model.jax(x, t)[..., :C]
    got = dpm_solver.sample(
        predict, jnp.asarray(x_init), ref.alphas_cumprod.numpy(), ts, final_sigmas_type=final_sigmas_type
    )
    # diffusers computes its coefficients in float32, we in float64 (then cast): a few float32 ulps per step.
    assert rel_err(got, want) < 1e-5, rel_err(got, want)
    # Ours from iDDPM's float64 ᾱ: the only difference is diffusers' float32 ᾱ.
    ours = dpm_solver.sample(
        predict,
        jnp.asarray(x_init),
        iddpm.make_schedule(iddpm.linear_betas()).alphas_cumprod,
        ts,
        final_sigmas_type=final_sigmas_type,
    )
    assert rel_err(ours, want) < 1e-5, rel_err(ours, want)
