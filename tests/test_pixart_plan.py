"""configs/pixart_alpha.py's stages end to end at toy size, single-stage on Stage A latents:
the re-parameterised DiT start, each stage starting from the last, multi-aspect buckets with PixArtMS's
micro-conditions in stage 3, and sampling prompts with no Stage B."""

import logging

import jax
import numpy as np
import pytest
from diffusers import DiTTransformer2DModel
from PIL import Image

from conftest import load_config, random_variables, tiny_t5_folder
from torch_reference import randomise
from wurst_jax import checkpoint, config_lib, convert, tasks, train
from wurst_jax.convert.dit import pixart_from_dit
from wurst_jax.evaluate import job
from wurst_jax.models.stage_a import VQGAN
from wurst_jax.pipeline import Pipeline, needs_stage_b


@pytest.fixture(scope='module')
def plan_folders(tmp_path_factory):
    """Tiny local folders: a random DiT (4 latent channels), a random f4 VQGAN, a T5 text encoder, and
    captioned images of three shapes: 8 landscape (h/w 0.5), 8 portrait (2.0) and 8 square."""
    root = tmp_path_factory.mktemp('plan')
    dit = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=4,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_eps=1e-6,
    )
    randomise(dit, seed=0, scale=0.05).save_pretrained(root / 'dit')
    vqgan = VQGAN(levels=2, embed_dim=8, bottleneck_blocks=1, latent_channels=4, num_codes=16)
    convert.save_diffusers(
        vqgan, random_variables(vqgan, np.zeros((1, 16, 16, 3), np.float32)), str(root / 'vqgan'), 'vqgan'
    )
    tiny_t5_folder(root / 't5')
    images = root / 'images'
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(24, 48)] * 8 + [(48, 24)] * 8 + [(40, 40)] * 8):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / f'{i}.png')
        (images / f'{i}.txt').write_text(['the cat', 'a photo of a dog'][i % 2])
    return root


def plan_config(root, stage: int, init: str = ''):
    init = f',init={init}' if init else ''
    config = load_config(
        'pixart_alpha', f'stage={stage},runlocal,dit={root}/dit,t5={root}/t5,stage_a={root}/vqgan{init}'
    )
    config.input.update(
        dataset='image_folder',
        folder=str(root / 'images'),
        data_dir=str(root / 'tfds'),
        eval_split='train',
        bucket_multiple=8,
    )
    tasks.validate(config)
    return config


def max_delta(a, b) -> float:
    common = {k: v for k, v in a.items() if k in b}
    return max(
        jax.tree.leaves(
            jax.tree.map(lambda x, y: float(np.abs(np.asarray(x) - y).max()), common, {k: b[k] for k in common})
        )
    )


def test_plan_runs_from_the_dit_start_to_multi_aspect_buckets(plan_folders, tmp_path, caplog):
    root = plan_folders
    # Stage 1 starts from the DiT, re-parameterised; lr 2e-5 and clipping at 0.01 barely move it in 2 steps.
    train.train_and_evaluate(plan_config(root, 1), str(tmp_path / 'stage1'))
    _, start = pixart_from_dit(str(root / 'dit'), caption_channels=32)
    _, one = checkpoint.load_trained(str(tmp_path / 'stage1'))
    assert 0 < max_delta(one['params']['prior'], start['params']) < 1e-3

    # Stage 3, started here from stage 1's run (stage 2 starts from a run the same way, at stage 1's size):
    # buckets of 32 px area (24x48, 48x24, 32x32 at multiples of 8), one per batch, each its own compiled
    # step; the size embedders are new, everything else comes from the run before.
    config = plan_config(root, 3, str(tmp_path / 'stage1'))
    config.total_steps = 3  # one epoch: a batch of each bucket
    with caplog.at_level(logging.INFO):
        train.train_and_evaluate(config, str(tmp_path / 'stage3'))
    shapes = {
        m.split("image', (8, ")[1].split(')')[0]
        for m in caplog.messages
        if m.startswith('compiled the train step for batch shapes')
    }
    assert shapes == {'24, 48, 3', '48, 24, 3'}, caplog.messages  # 32x32 is the first, compiled up front
    _, three = checkpoint.load_trained(str(tmp_path / 'stage3'))
    prior = three['params']['prior']
    assert 'resolution_embedder' in prior and 'resolution_embedder' not in one['params']['prior']
    assert 0 < max_delta(prior, one['ema_params']['prior']) < 1e-3

    # Prompts to images through Stage A alone; a run root with stage_c/ only is enough for the
    # sample CLI and the evaluation job.
    pipeline = Pipeline(str(tmp_path / 'stage3'), None)
    images = pipeline(['the cat', 'a photo of a dog'], batch_size=2)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8 and images.std() > 0
    # iDDPM's ancestral sampler instead of the config's DPM-Solver; a cosine-process sampler is refused.
    ancestral = pipeline(['the cat', 'a photo of a dog'], batch_size=2, prior_sampler='iddpm')
    assert ancestral.shape == images.shape and not np.array_equal(ancestral, images)
    with pytest.raises(ValueError, match="prior_sampler='ddim'"):
        pipeline(['the cat'], prior_sampler='ddim')
    run_root = tmp_path / 'root'
    run_root.mkdir()
    (run_root / 'stage_c').symlink_to(tmp_path / 'stage3')
    assert not needs_stage_b(str(run_root))
    prompts = tmp_path / 'prompts.txt'
    prompts.write_text('the cat\n')
    eval_config = load_config('eval')
    eval_config.update(workdir=str(run_root), prompts=str(prompts))
    job.validate(eval_config)


def test_plan_refuses_a_start_that_does_not_fit(plan_folders, tmp_path):
    config = plan_config(plan_folders, 3, str(plan_folders / 'dit'))  # a DiT has no size embedders
    with pytest.raises(config_lib.ConfigError, match='use_additional_conditions=True'):
        train.train_and_evaluate(config, str(tmp_path / 'run'))
    config = plan_config(plan_folders, 2, str(plan_folders / 'vqgan'))
    with pytest.raises(ValueError, match='PaellaVQModel'):
        train.train_and_evaluate(config, str(tmp_path / 'run'))


def test_buckets_whose_latents_are_not_whole_patches_are_refused_at_start(plan_folders):
    """At 32 px and f4 latents, sides on a multiple of 4 give odd latent sides for some buckets
    (e.g. 20 px -> 5), which PixArt's 2x2 patches cannot cover: refused before any step, by the field."""
    config = plan_config(plan_folders, 3)
    config.input.bucket_multiple = 4
    with pytest.raises(config_lib.ConfigError, match=r'input.bucket_multiple.*multiple of 8 pixels'):
        tasks.create(config)
    config.input.bucket_multiple = 8
    assert tasks.create(config).backbone == 'pixart'
