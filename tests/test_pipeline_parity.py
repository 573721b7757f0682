"""The three-stage chain's denoising loops against diffusers' WuerstchenPriorPipeline and
WuerstchenDecoderPipeline: tiny random diffusers and transformers models, loaded into our Stage C and
Stage B tasks through wurst_jax.convert, sampled by the task methods the Pipeline runs, with the
noise our chains draw fed to diffusers."""

import diffusers.schedulers.scheduling_ddpm_wuerstchen as scheduler_module
import jax
import numpy as np
import pytest
import torch
import transformers
from diffusers import DDPMWuerstchenScheduler
from diffusers.pipelines.deprecated.wuerstchen import (
    PaellaVQModel,
    WuerstchenDecoderPipeline,
    WuerstchenDiffNeXt,
    WuerstchenPrior,
    WuerstchenPriorPipeline,
)

from conftest import load_config, tiny_clip_folder
from torch_reference import nchw, nhwc, randomise, rel_err, step_noises
from wurst_jax import convert, tasks

PROMPTS = ['a photo of a cat', 'the dog']
MAX_LENGTH, IMAGE_SIZE = 8, 32
PRIOR_STEPS, PRIOR_GUIDANCE = 3, 4.0
DECODER_STEPS, DECODER_GUIDANCE = 2, 2.0
# One level keeps the compile short; test_convert.py checks deeper decoders against diffusers.
DECODER = dict(
    c_r=8,
    patch_size=1,
    c_cond=16,
    c_hidden=[16],
    nhead=[2],
    blocks=[1],
    level_config=['CTA'],
    inject_effnet=[True],
    kernel_size=3,
    dropout=0.0,
)


@pytest.fixture(scope='module')
def folders(tmp_path_factory, tiny_stage_folders):
    """Model folders by name: CLIP text encoder + tokenizer, prior, decoder and VQGAN, and conftest's
    effnet (32 px images -> 8 x 8 x 4 maps: the prior's c_in and the decoder's effnet_embd)."""
    root = tmp_path_factory.mktemp('pipeline_parity')
    tiny_clip_folder(root / 'clip')
    prior = randomise(WuerstchenPrior(c_in=4, c=16, c_cond=32, c_r=8, depth=2, nhead=2, dropout=0.0), seed=1)
    decoder = randomise(WuerstchenDiffNeXt(c_in=4, c_out=4, effnet_embd=4, clip_embd=32, **DECODER), seed=2)
    with torch.no_grad():  # keep the divisors of the outputs off 0 (as test_convert.py does)
        prior.out[1].weight.mul_(0.05)
        prior.out[1].bias.mul_(0.05)
        decoder.clf[1].weight.mul_(0.1)
    prior.save_pretrained(root / 'prior')
    decoder.save_pretrained(root / 'decoder')
    randomise(
        PaellaVQModel(levels=2, embed_dim=16, bottleneck_blocks=1, latent_channels=4, num_vq_embeddings=32), seed=3
    ).save_pretrained(root / 'vqgan')
    return {
        **{name: root / name for name in ('clip', 'prior', 'decoder', 'vqgan')},
        'effnet': tiny_stage_folders['effnet'],
    }


def _prior_task(folders):
    config = load_config(
        'wuerstchen_v2_prior_finetune',
        f'prior={folders["prior"]},clip={folders["clip"]},effnet={folders["effnet"]},res={IMAGE_SIZE}',
    )
    config.text.max_length = MAX_LENGTH
    config.sample.update(prior_timesteps='linspace', prior_steps=PRIOR_STEPS, prior_guidance=PRIOR_GUIDANCE)
    task = tasks.create(config)
    return task, task.pretrained_params()


def _decoder_task(folders):
    config = load_config(
        'stage_b', f'vqgan={folders["vqgan"]},effnet={folders["effnet"]},clip={folders["clip"]},res={IMAGE_SIZE}'
    )
    config.dtype = 'float32'
    config.model.update(DECODER, remat_policy='none')
    config.text.max_length = MAX_LENGTH
    config.sample.update(decoder_steps=DECODER_STEPS, decoder_guidance=DECODER_GUIDANCE)
    task = tasks.create(config)
    return task, {'decoder': convert.load_diffusers(str(folders['decoder']), 'decoder')[1]['params']}


def _task_noise(key, shape, steps):
    """The initial and per-step noise of a task's `sample` from `key` (its split, then samplers.sample's), NCHW."""
    init_rng, rng = jax.random.split(key)
    return nchw(np.array(jax.random.normal(init_rng, shape))), [nchw(n) for n in step_noises(rng, steps, shape)]


def _feed(monkeypatch, noises):
    """DDPMWuerstchenScheduler.step draws its noise with randn_tensor: it gets `noises` in turn."""
    it = iter(noises)
    monkeypatch.setattr(scheduler_module, 'randn_tensor', lambda *a, **k: next(it))


def test_prior_and_decoder_chains_equal_diffusers(folders, monkeypatch):
    """Prompts -> Stage C image embeddings -> Stage B latents, with CFG on both stages (zero map and empty
    caption for the decoder's unconditional half), against diffusers' two pipelines."""
    prior_task, prior_params = _prior_task(folders)
    decoder_task, decoder_params = _decoder_task(folders)
    prior_frozen, decoder_frozen = prior_task.frozen_params(), decoder_task.frozen_params()
    p_enc, d_enc = prior_task.tokenizer(PROMPTS), decoder_task.tokenizer(PROMPTS)
    prior_key, decoder_key = jax.random.split(jax.random.key(0))  # one key per stage, as the Pipeline splits
    effnet = jax.jit(prior_task.sample)(
        prior_params, prior_frozen, p_enc['input_ids'], p_enc['attention_mask'], prior_key
    )
    latents = jax.jit(decoder_task.sample_latents)(
        decoder_params, decoder_frozen, effnet, d_enc['input_ids'], d_enc['attention_mask'], decoder_key
    )

    tokenizer = transformers.CLIPTokenizer.from_pretrained(folders['clip'])
    tokenizer.model_max_length = MAX_LENGTH
    text_encoder = transformers.CLIPTextModel.from_pretrained(folders['clip'])
    h, w, c = prior_task.latent_shape()
    prior_init, prior_noises = _task_noise(prior_key, (len(PROMPTS), h, w, c), PRIOR_STEPS)
    _feed(monkeypatch, prior_noises)
    prior_pipe = WuerstchenPriorPipeline(
        tokenizer,
        text_encoder,
        WuerstchenPrior.from_pretrained(folders['prior']),
        DDPMWuerstchenScheduler(),
        resolution_multiple=IMAGE_SIZE / h,
    )
    with torch.no_grad():
        embeddings = prior_pipe(
            PROMPTS,
            height=IMAGE_SIZE,
            width=IMAGE_SIZE,
            num_inference_steps=PRIOR_STEPS,
            guidance_scale=PRIOR_GUIDANCE,
            latents=prior_init,
        ).image_embeddings
    assert rel_err(effnet, nhwc(embeddings)) <= 1e-4

    decoder_init, decoder_noises = _task_noise(decoder_key, latents.shape, DECODER_STEPS)
    decoder_pipe = WuerstchenDecoderPipeline(
        tokenizer,
        text_encoder,
        WuerstchenDiffNeXt.from_pretrained(folders['decoder']),
        DDPMWuerstchenScheduler(),
        PaellaVQModel.from_pretrained(folders['vqgan']),
        latent_dim_scale=latents.shape[1] / h,
    )
    expected = []
    for i, prompt in enumerate(PROMPTS):  # one prompt a call: diffusers repeats a list of prompts per embedding
        _feed(monkeypatch, [n[i : i + 1] for n in decoder_noises])
        with torch.no_grad():
            expected.append(
                decoder_pipe(
                    embeddings[i : i + 1],
                    prompt,
                    num_inference_steps=DECODER_STEPS,
                    guidance_scale=DECODER_GUIDANCE,
                    latents=decoder_init[i : i + 1],
                    output_type='latent',
                ).images
            )
    assert rel_err(latents, nhwc(torch.cat(expected))) <= 1e-4
