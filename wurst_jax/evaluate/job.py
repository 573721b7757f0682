"""The offline evaluation job (configs/eval.py): score each Stage C checkpoint of a run.

For every checkpoint step it generates one image per prompt with the run's EMA params (prompts
split contiguously across processes, so an image depends only on the seed and its prompt's
position), computes the metrics whose weights are given, and writes OUT/STEP/metrics.json,
OUT/STEP/grid.png and TensorBoard scalars. A step whose metrics.json exists is not scored again,
so a restarted job picks up where it stopped.
"""

import json
import logging
import os
import time

import jax
import ml_collections
import numpy as np
from clu import metric_writers
from jax.experimental import multihost_utils

from wurst_jax import checkpoint, visualize
from wurst_jax.config_lib import ConfigError
from wurst_jax.data.prompts import read_prompts
from wurst_jax.evaluate import clip_metrics, fid, gather, shapes_alignment
from wurst_jax.pipeline import Pipeline, needs_stage_b, parse_temperature

_WAIT, _DONE = -1, -2


def validate(config: ml_collections.ConfigDict) -> None:
    """Errors that name the field, before anything slow is loaded."""
    if not config.workdir or not os.path.isdir(os.path.join(config.workdir, 'stage_c')):
        raise ConfigError(
            'workdir',
            config.workdir,
            'a run root with stage_c/ (and stage_b/ unless Stage C is '
            'single-stage; python -m wurst_jax.demo --workdir=DIR writes one)',
        )
    if needs_stage_b(config.workdir) and not checkpoint.all_steps(os.path.join(config.workdir, 'stage_b')):
        raise ConfigError('workdir', config.workdir, 'its stage_b/ has no checkpoint: train Stage B first')
    if not config.follow and not checkpoint.all_steps(os.path.join(config.workdir, 'stage_c')):
        raise ConfigError(
            'workdir',
            config.workdir,
            'its stage_c/ has no checkpoint to score; with --config.follow=True the job waits for the first',
        )
    if not config.prompts or not os.path.isfile(config.prompts):
        raise ConfigError('prompts', config.prompts, 'an existing text file with one prompt per line')
    for field, is_ok in (
        ('inception_weights', os.path.isfile),
        ('reference_stats', os.path.isfile),
        ('clip_weights', os.path.isdir),
    ):
        if config[field] and not is_ok(config[field]):
            raise ConfigError(
                field,
                config[field],
                'not found: give an existing local path, or leave it empty to skip the metrics that need it',
            )
    if config.fid_resize not in fid.RESIZE_MODES:
        raise ConfigError('fid_resize', config.fid_resize, f'one of {fid.RESIZE_MODES}')
    if config.clip_score not in clip_metrics.CONVENTIONS:
        raise ConfigError('clip_score', config.clip_score, f'one of {clip_metrics.CONVENTIONS}')
    if config.batch_size <= 0:
        raise ConfigError('batch_size', config.batch_size, 'a positive number of images')
    for field in ('height', 'width'):
        if config[field] < 0:
            raise ConfigError(field, config[field], "a number of pixels, or 0 for the stages' trained size")


class Scorers:
    """The feature networks and reference data, loaded once for all steps."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config, self.skipped = config, {}
        self.inception = self.clip = None
        self.reference = fid.load_stats(config.reference_stats) if config.reference_stats else {}
        if config.inception_weights:
            from wurst_jax.convert.inception import load_inception_fid

            self.inception = fid.InceptionFeatures(
                *load_inception_fid(config.inception_weights), resize=config.fid_resize, batch_size=config.batch_size
            )
        if config.clip_weights:
            self.clip = clip_metrics.CLIPEmbedder(config.clip_weights, batch_size=config.batch_size)
        if not self.inception:
            self.skipped['fid'] = 'no inception_weights given'
        elif not self.reference:
            self.skipped['fid'] = 'no reference_stats given (the generated statistics are saved)'
        if not self.clip:
            self.skipped['clip_score'] = self.skipped['cmmd'] = 'no clip_weights given'
        elif 'clip_embeds' not in self.reference:
            self.skipped['cmmd'] = 'reference_stats hold no clip_embeds (make them with --clip_weights)'
        elif self.reference['clip_embeds'].shape[1] != self.clip.vision.projection_dim:
            raise ConfigError(
                'reference_stats',
                config.reference_stats,
                f'its clip_embeds have dimension {self.reference["clip_embeds"].shape[1]}, the network '
                f'in clip_weights {self.clip.vision.projection_dim}: make them with the same CLIP',
            )

    def __call__(self, images: np.ndarray, prompts: list[str], out_dir: str) -> dict:
        """Metrics of this process's images and prompts, combined over all processes."""
        metrics = {}
        if self.inception:
            stats = fid.GaussianStats()
            stats.update(self.inception(images))
            mu, sigma = stats.all_processes().mean_and_cov()
            if jax.process_index() == 0:
                fid.save_stats(os.path.join(out_dir, 'generated_stats.npz'), mu, sigma)
            if self.reference:
                metrics['fid'] = fid.frechet_distance(mu, sigma, self.reference['mu'], self.reference['sigma'])
        if self.clip:
            image_embeds = self.clip.image_embeds(images)
            cosines = gather.allgather_rows((image_embeds * self.clip.text_embeds(prompts)).sum(-1))
            metrics[f'clip_score_{self.config.clip_score}'] = clip_metrics.clip_score(cosines, self.config.clip_score)
            if 'clip_embeds' in self.reference:
                if images.shape[1] != images.shape[2]:  # the two preprocessings differ only off squares
                    image_embeds = self.clip.image_embeds(images, 'cmmd')
                metrics['cmmd'] = clip_metrics.cmmd(
                    gather.allgather_rows(image_embeds),
                    self.reference['clip_embeds'],
                    self.config.cmmd_sigma,
                    self.config.cmmd_scale,
                )
        return metrics


def process_share(count: int) -> tuple[int, int]:
    """[lo, hi) of the prompts this process generates: contiguous, sizes differing by at most one."""
    p, n = jax.process_index(), jax.process_count()
    return p * count // n, (p + 1) * count // n


def _sampling_options(config: ml_collections.ConfigDict) -> dict:
    return dict(
        seed=config.seed,
        batch_size=config.batch_size,
        prior_steps=config.prior_steps or None,
        decoder_steps=config.decoder_steps or None,
        prior_guidance=None if config.prior_guidance < 0 else config.prior_guidance,
        decoder_guidance=None if config.decoder_guidance < 0 else config.decoder_guidance,
        decoder_temperature=decoder_temperature(config.decoder_temperature),
        negative_prompt=config.negative_prompt or None,
        height=config.height or None,
        width=config.width or None,
    )


def decoder_temperature(value: str) -> tuple[float, float] | None:
    try:
        return parse_temperature(value)
    except ValueError as e:
        raise ConfigError('decoder_temperature', value, f"{e}, or '' for the Stage B config's") from None


def evaluate_step(config: ml_collections.ConfigDict, step: int, prompts: list[str], scorers: Scorers, pipeline) -> dict:
    """Generates and scores the images of Stage C checkpoint `step`, whose params `pipeline` holds;
    returns its metrics.json content."""
    out_dir = os.path.join(config.out_dir, str(step))
    os.makedirs(out_dir, exist_ok=True)
    start = time.time()
    lo, hi = process_share(len(prompts))
    images = pipeline(prompts[lo:hi], first_index=lo, **_sampling_options(config))
    sampling_s = time.time() - start
    metrics = scorers(images, prompts[lo:hi], out_dir)
    if pipeline.prior_task.config.input.dataset == 'shapes':  # small images: gather them all
        metrics.update(shapes_alignment.evaluate(gather.allgather_rows(images), prompts))
    grid = gather.allgather_rows(images[: config.num_grid_images])[: config.num_grid_images]
    result = {
        'step': step,
        'num_images': len(prompts),
        'metrics': metrics,
        'skipped': scorers.skipped,
        'sampling_s': round(sampling_s, 1),
        'total_s': round(time.time() - start, 1),
        'conventions': {
            'fid_resize': config.fid_resize,
            'clip_score': config.clip_score,
            'clip_network': scorers.clip.name if scorers.clip else None,
            'cmmd_sigma': config.cmmd_sigma,
            'cmmd_scale': config.cmmd_scale,
        },
    }
    if jax.process_index() == 0:
        visualize.save_png(
            os.path.join(out_dir, 'grid.png'),
            visualize.image_grid(grid.astype(np.float32) / 127.5 - 1, ncols=min(8, len(grid))),
        )
        with open(os.path.join(out_dir, 'metrics.json'), 'w') as f:
            json.dump(result, f, indent=1)
    return result


def _evaluated(config: ml_collections.ConfigDict, step: int) -> bool:
    return os.path.isfile(os.path.join(config.out_dir, str(step), 'metrics.json'))


def next_step(config: ml_collections.ConfigDict) -> int:
    """The oldest unscored checkpoint step, _WAIT while training may still write one, else _DONE.
    Decided on process 0 and broadcast, so every process scores the same step."""
    stage_c = os.path.join(config.workdir, 'stage_c')
    decision = _DONE
    if jax.process_index() == 0:
        complete = checkpoint.is_complete(stage_c)  # read before listing: a last save is then never missed
        wanted = {int(s) for s in config.steps.split(',') if s.strip()} if config.steps else None
        todo = [
            s for s in checkpoint.all_steps(stage_c) if (wanted is None or s in wanted) and not _evaluated(config, s)
        ]
        decision = todo[0] if todo else (_WAIT if config.follow and not complete else _DONE)
    return int(multihost_utils.broadcast_one_to_all(np.int32(decision)))


def run(config: ml_collections.ConfigDict) -> list[dict]:
    """Scores every checkpoint (following the run when config.follow); returns the new results."""
    validate(config)
    config = ml_collections.ConfigDict(config)
    config.out_dir = config.out_dir or os.path.join(config.workdir, 'eval')
    prompts = read_prompts(config.prompts)
    scorers = Scorers(config)
    writer = metric_writers.create_default_writer(config.out_dir, just_logging=jax.process_index() > 0)
    results, pipeline = [], None
    while (step := next_step(config)) != _DONE:
        if step == _WAIT:
            time.sleep(config.poll_seconds)
            continue
        if pipeline is None:  # JAX-heavy: built once the inputs are checked and a checkpoint exists
            pipeline = Pipeline.from_root(config.workdir, prior_step=step, devices=jax.local_devices())
        else:  # same compiled sampler, new params
            pipeline.load_prior_step(step)
        result = evaluate_step(config, step, prompts, scorers, pipeline)
        logging.info('step %d: %s', step, result['metrics'])
        writer.write_scalars(step, {**result['metrics'], 'sampling_s': result['sampling_s']})
        writer.flush()
        results.append(result)
    return results
