"""PixArt-α in the Stage C task: iDDPM's diffusion (`diffusion.process='iddpm'`) with DPM-Solver++ sampling
equal to diffusers' PixArtAlphaPipeline denoising loop on the same weights, text states and noise; the
hybrid-loss step and its held-out loss; the configs it refuses; and a fine-tune as a user starts one, from
an original `.pth` and a T5 encoder folder, its masked T5 states equal to transformers' in that loop."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel

from conftest import REPO, load_config, tiny_t5_folder
from torch_reference import PIXART_DPM, nchw, nhwc, original_pixart_state, randomise, rel_err
from wurst_jax import checkpoint, tasks, train
from wurst_jax.config_lib import ConfigError
from wurst_jax.data import input_pipeline
from wurst_jax.pipeline import Pipeline

TEXT_WIDTH = 32  # configs/shapes.py:runlocal's trained text encoder


def iddpm_config(vqgan_folder, prior_folder=''):
    """Single-stage PixArt on the tiny VQGAN's 8x8x4 latents of 32 px images, iDDPM + DPM-Solver."""
    config = load_config('shapes', 'stage=c,backbone=pixart,latents=stage_a,runlocal')
    config.stage_a.source = str(vqgan_folder)
    config.init.prior = str(prior_folder)
    config.diffusion.update(process='iddpm', sampler='dpm_solver', prediction='epsilon')
    config.model.c = 24
    return config


def random_pixart(out_channels: int = 8) -> PixArtTransformer2DModel:
    """A random two-block PixArt on 8x8x4 latents reading TEXT_WIDTH-wide text states."""
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
    return model


def random_pixart_folder(path, out_channels: int = 8) -> PixArtTransformer2DModel:
    model = random_pixart(out_channels)
    model.save_pretrained(path)
    return model


def pixart_pipeline_loop(model, latents, cond, uncond, steps: int, guidance: float, masks=None) -> np.ndarray:
    """diffusers' PixArtAlphaPipeline.__call__ denoising loop (`output_type='latent'`), with the
    DPMSolverMultistepScheduler configuration of PixArt-alpha's released pipelines; `masks` are the
    (cond, uncond) T5 attention masks."""
    scheduler = DPMSolverMultistepScheduler(**PIXART_DPM)
    scheduler.set_timesteps(steps)
    x = nchw(latents)
    states = torch.from_numpy(np.concatenate([uncond, cond]))
    mask = None if masks is None else torch.from_numpy(np.concatenate([masks[1], masks[0]]))
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = model(
                torch.cat([x, x]),
                encoder_hidden_states=states,
                encoder_attention_mask=mask,
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


def test_fine_tune_from_an_original_checkpoint_and_a_t5_folder(tiny_stage_folders, tmp_path):
    """configs/pixart_alpha.py at stage 2 from PixArt-alpha's `.pth` layout and a transformers T5 folder:
    the converted model samples what diffusers' pipeline loop samples from transformers' T5 states and
    masks; padded tokens are masked; T5 states precomputed in bfloat16 with their masks train the same
    step as T5 in the step; two training steps on them, then images from prompts."""
    tiny_t5_folder(tmp_path / 't5', d_model=TEXT_WIDTH)
    reference = random_pixart()
    torch.save({'state_dict': original_pixart_state(reference, seed=0)}, tmp_path / 'PixArt.pth')
    arg = f'stage=2,runlocal,init={tmp_path}/PixArt.pth,t5={tmp_path}/t5,stage_a={tiny_stage_folders["vqgan"]}'
    config = load_config('pixart_alpha', arg)
    # 32 px images: Stage A's 8x8 latents, the checkpoint's grid.
    config.input.update(dataset='shapes', image_size=32, data_dir=str(tmp_path / 'data'))
    config.input.shapes.update(num_train=16, num_test=8)
    tasks.validate(config)
    task = tasks.create(config)
    assert task.text.masked and config.text.max_length == 120
    params, frozen = task.pretrained_params(), task.frozen_params()

    prompts = ['a photo of the cat', 'the dog on a red mat']
    tokens = task.tokenizer(prompts)
    cond, uncond = task.text.encode_for_guidance(params, frozen, tokens['input_ids'], tokens['attention_mask'])
    t5 = transformers.T5EncoderModel.from_pretrained(tmp_path / 't5')
    empty = task.tokenizer([''] * len(prompts))
    with torch.no_grad():
        ref_cond, ref_uncond = (
            t5(
                input_ids=torch.from_numpy(t['input_ids']).long(), attention_mask=torch.from_numpy(t['attention_mask'])
            ).last_hidden_state.numpy()
            for t in (tokens, empty)
        )
    key = jax.random.key(5)
    latents = np.asarray(jax.random.normal(jax.random.split(key)[0], (2, *task.latent_shape())))
    ours = jax.jit(lambda p, c, u, k: task.sample_from_states(p, c, u, k, steps=8, guidance=4.5))(
        params, cond, uncond, key
    )
    masks = (tokens['attention_mask'], empty['attention_mask'])
    ref = pixart_pipeline_loop(reference, latents, ref_cond, ref_uncond, 8, 4.5, masks)
    assert rel_err(ours, ref) < 1e-4, rel_err(ours, ref)
    unmasked = pixart_pipeline_loop(reference, latents, ref_cond, ref_uncond, 8, 4.5)
    assert rel_err(ours, unmasked) > 100 * rel_err(ours, ref)  # attending to the padding differs: masks were read

    images = next(
        input_pipeline.create_eval_iterator(config.input, split='train', batch_size=8, tokenizer=task.tokenizer)
    )
    command = [sys.executable, '-m', 'wurst_jax.precompute', f'--config=configs/pixart_alpha.py:{arg}']
    command += [f'--config.input.{k}={v}' for k, v in (('dataset', 'shapes'), ('image_size', 32))]
    command += [f'--config.input.data_dir={tmp_path / "data"}', f'--out={tmp_path / "pre"}', '--dtype=bfloat16']
    command += ['--config.input.shapes.num_train=16', '--config.input.shapes.num_test=8', '--batch_size=8']
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    pre_config = config.copy_and_resolve_references()
    pre_config.input.precomputed = str(tmp_path / 'pre')
    tasks.validate(pre_config)
    pre_task = tasks.create(pre_config)
    assert set(pre_task.batch_spec()) == {'latents', 'text_states', 'text_mask'}
    records = next(input_pipeline.create_eval_iterator(pre_config.input, split='train', batch_size=8))
    states = task.text.encode(frozen['text'], jnp.asarray(images['tokens']), jnp.asarray(images['token_mask']))
    np.testing.assert_array_equal(records['text_mask'], images['token_mask'])
    np.testing.assert_allclose(records['text_states'], states.states, rtol=1e-2, atol=1e-2)  # bfloat16
    pre_frozen = pre_task.frozen_params()  # no T5 weights: the empty caption's states and mask, stored once
    empty = task.text.empty_states(frozen['text'])
    assert 'text' not in pre_frozen and pre_frozen['text_empty'].states.shape == empty.states.shape
    np.testing.assert_array_equal(pre_frozen['text_empty'].mask, empty.mask)
    np.testing.assert_allclose(pre_frozen['text_empty'].states, empty.states, rtol=1e-2, atol=1e-2)  # bfloat16
    keys = ('image', 'tokens', 'token_mask'), ('latents', 'text_states', 'text_mask')
    losses = [
        t.grads(params, {}, f, {k: jnp.asarray(b[k]) for k in ks}, jax.random.key(1), 0)[2]['loss']
        for t, f, b, ks in ((task, frozen, images, keys[0]), (pre_task, pre_frozen, records, keys[1]))
    ]
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)

    workdir = str(tmp_path / 'run')
    train.train_and_evaluate(pre_config, workdir)
    _, state = checkpoint.load_trained(workdir)
    assert set(state['params']) == {'prior'}  # T5 stays frozen, outside the checkpoint
    images = Pipeline(workdir, None)(prompts, batch_size=2)
    assert images.shape == (2, 32, 32, 3) and images.std() > 0
