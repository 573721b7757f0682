"""PixArt-α's diffusion in the Stage C task (`diffusion.process='iddpm'`): DPM-Solver++ sampling equal to
diffusers' PixArtAlphaPipeline denoising loop on the same weights, text states and noise; the hybrid-loss
step and its held-out loss; the configs it refuses."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel

from conftest import load_config
from torch_reference import nchw, nhwc, randomise, rel_err
from wurst_jax import tasks
from wurst_jax.config_lib import ConfigError

TEXT_WIDTH = 32  # configs/shapes.py:runlocal's trained text encoder


def iddpm_config(vqgan_folder, prior_folder=''):
    """Single-stage PixArt on the tiny VQGAN's 8x8x4 latents of 32 px images, iDDPM + DPM-Solver."""
    config = load_config('shapes', 'stage=c,backbone=pixart,latents=stage_a,runlocal')
    config.stage_a.source = str(vqgan_folder)
    config.init.prior = str(prior_folder)
    config.diffusion.update(process='iddpm', sampler='dpm_solver', prediction='epsilon')
    config.model.c = 24
    return config


def random_pixart_folder(path, out_channels: int = 8):
    model = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=out_channels,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        caption_channels=TEXT_WIDTH,
        cross_attention_dim=24,
        use_additional_conditions=False,
    )
    positions = model.pos_embed.pos_embed.clone()
    randomise(model, seed=0, scale=0.1)
    with torch.no_grad():
        model.pos_embed.pos_embed.copy_(positions)
    model.save_pretrained(path)
    return model


def pixart_pipeline_loop(model, latents, cond, uncond, steps: int, guidance: float) -> np.ndarray:
    """diffusers' PixArtAlphaPipeline.__call__ denoising loop (`output_type='latent'`), with the
    DPMSolverMultistepScheduler configuration of PixArt-alpha's released pipelines."""
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule='linear',
        algorithm_type='dpmsolver++',
        solver_order=2,
        solver_type='midpoint',
        lower_order_final=True,
        prediction_type='epsilon',
    )
    scheduler.set_timesteps(steps)
    x = nchw(latents)
    states = torch.from_numpy(np.concatenate([uncond, cond]))
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = model(
                torch.cat([x, x]),
                encoder_hidden_states=states,
                timestep=t.expand(2 * x.shape[0]),
                added_cond_kwargs={'resolution': None, 'aspect_ratio': None},
            ).sample
            eps_u, eps_c = out.chunk(2)
            eps = (eps_u + guidance * (eps_c - eps_u)).chunk(2, dim=1)[0]  # learned sigma: ε half only
            x = scheduler.step(eps, t, x).prev_sample
    return nhwc(x)


def test_dpm_solver_sampling_equals_the_pixart_alpha_pipeline(tiny_stage_folders, tmp_path):
    reference = random_pixart_folder(tmp_path / 'pixart')
    config = iddpm_config(tiny_stage_folders['vqgan'], tmp_path / 'pixart')
    tasks.validate(config)
    task = tasks.create(config)
    params = task.pretrained_params()
    rng = np.random.default_rng(0)
    length = config.text.max_length
    cond, uncond = (rng.standard_normal((2, length, TEXT_WIDTH)).astype(np.float32) for _ in range(2))
    key = jax.random.key(3)
    latents = jax.random.normal(jax.random.split(key)[0], (2, *task.latent_shape()))  # the task's first draw
    for steps, guidance in ((20, 4.5), (8, 1.0)):
        ours = jax.jit(lambda p, c, u, k: task.sample_from_states(p, c, u, k, steps=steps, guidance=guidance))(
            params, cond, uncond, key
        )
        ref = pixart_pipeline_loop(reference, np.asarray(latents), cond, uncond, steps, guidance)
        assert rel_err(ours, ref) < 1e-4, (steps, rel_err(ours, ref))


def test_iddpm_step_trains_the_variance_and_scores_held_out(tiny_stage_folders):
    config = iddpm_config(tiny_stage_folders['vqgan'])
    config.text.dropout = 0.0
    tasks.validate(config)
    task = tasks.create(config)
    assert task.prior.out_channels == 8  # ε and the learned-range variance
    rng = np.random.default_rng(0)
    tokens = task.tokenizer(['a red circle on the left'] * 4)
    batch = {
        'image': jnp.asarray(rng.uniform(-1, 1, (4, 32, 32, 3)), jnp.float32),
        'tokens': jnp.asarray(tokens['input_ids']),
        'token_mask': jnp.asarray(tokens['attention_mask']),
    }
    params, state = task.init(jax.random.key(0), batch)
    params = jax.tree.map(lambda x: getattr(x, 'value', x), params, is_leaf=lambda x: hasattr(x, 'value'))
    frozen = task.frozen_params()
    tx = optax.adam(3e-3)

    @jax.jit
    def step(params, opt, key):
        grads, _, metrics = task.grads(params, state, frozen, batch, key, jnp.int32(0))
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, metrics, grads

    opt = tx.init(params)
    before = task.evaluate(params, state, frozen, [jax.tree.map(np.asarray, batch)])
    vb = []
    for i in range(40):
        params, opt, metrics, grads = step(params, opt, jax.random.key(i % 4))
        vb.append(float(metrics['vb']))
        assert np.isfinite(float(metrics['loss'])) and float(metrics['loss']) == pytest.approx(
            float(metrics['mse']) + float(metrics['vb']), rel=1e-5
        )
    assert np.mean(vb[-4:]) < np.mean(vb[:4])  # the variance half learns from L_vb
    after = task.evaluate(params, state, frozen, [jax.tree.map(np.asarray, batch)])
    assert set(after) == set(before) and after['loss'] < before['loss']
    samples = jax.jit(lambda p, k: task.sample(p, frozen, batch['tokens'], batch['token_mask'], k, sampler='iddpm'))(
        params, jax.random.key(1)
    )
    assert samples.shape == (4, *task.latent_shape()) and np.isfinite(np.asarray(samples)).all()


def test_iddpm_refuses_what_it_cannot_train(tiny_stage_folders, tmp_path):
    def error(config) -> str:
        with pytest.raises(ConfigError) as info:
            tasks.validate(config)
            tasks.create(config)
        return str(info.value)

    config = iddpm_config(tiny_stage_folders['vqgan'])
    config.model.backbone = 'wuerstchen'
    assert 'config.diffusion.process' in error(config)
    config = iddpm_config(tiny_stage_folders['vqgan'])
    config.diffusion.sampler = 'ddpm'
    assert 'config.diffusion.sampler' in error(config) and 'dpm_solver' in error(config)
    config = iddpm_config(tiny_stage_folders['vqgan'])
    config.diffusion.process = 'ddim'
    assert 'config.diffusion.process' in error(config)
    random_pixart_folder(tmp_path / 'no_variance', out_channels=4)
    message = error(iddpm_config(tiny_stage_folders['vqgan'], tmp_path / 'no_variance'))
    assert 'config.init.prior' in message and 'learned variance' in message
