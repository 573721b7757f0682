"""Evaluation conventions against their reference implementations: the FID Inception against
pytorch-fid's network, the resizes against clean-fid and torch, the Fréchet distance against
pytorch-fid's, streaming statistics against np.cov, CLIP embeddings against transformers' CLIPModel,
CMMD against a direct NumPy computation."""

import functools
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from cleanfid import resize as clean_fid_resize
from flax import traverse_util
from PIL import Image
from pytorch_fid import fid_score
from pytorch_fid import inception as pytorch_fid_inception
from safetensors.numpy import save_file

from conftest import REPO, free_port, load_config, run_module, tiny_clip_tokenizer_folder
from torch_reference import nchw, nhwc, randomise, rel_err
from wurst_jax import checkpoint, demo, train
from wurst_jax.config_lib import ConfigError
from wurst_jax.convert import core
from wurst_jax.convert.inception import load_inception_fid
from wurst_jax.evaluate import clip_metrics, fid, job, shapes_alignment
from wurst_jax.models.inception import InceptionV3FID
from wurst_jax.pipeline import Pipeline


def random_inception_variables(seed: int = 0) -> dict:
    """He-scaled kernels and batch-norm statistics away from the identity, so every layer matters."""
    rng = np.random.default_rng(seed)
    shapes = traverse_util.flatten_dict(core.abstract_variables(InceptionV3FID(), core.component('inception_fid')))
    draws = {
        'kernel': lambda s: rng.standard_normal(s) * np.sqrt(2.0 / np.prod(s[:-1])),
        'scale': lambda s: rng.uniform(0.5, 1.5, s),
        'bias': lambda s: rng.normal(0, 0.1, s),
        'mean': lambda s: rng.normal(0, 0.1, s),
        'var': lambda s: rng.uniform(0.5, 1.5, s),
    }
    return traverse_util.unflatten_dict({p: draws[p[-1]](x.shape).astype(np.float32) for p, x in shapes.items()})


@pytest.fixture(scope='module')
def inception_weights(tmp_path_factory):
    """(variables, path of a pytorch-fid-style .pth holding them plus the 1008-way fc)."""
    variables = random_inception_variables()
    state = core.state_dict_from_variables(InceptionV3FID(), 'inception_fid', variables)
    state.update({'fc.weight': np.zeros((1008, 2048), np.float32), 'fc.bias': np.zeros(1008, np.float32)})
    path = tmp_path_factory.mktemp('inception') / 'pt_inception.pth'
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
    return variables, path


def test_inception_matches_pytorch_fid(inception_weights, monkeypatch):
    """pytorch-fid's own InceptionV3 (its FID blocks, built by its code) with our weights file in
    place of its download gives the same pool3 features, and our reader returns the same variables."""
    variables, path = inception_weights
    monkeypatch.setattr(
        pytorch_fid_inception,
        'load_state_dict_from_url',
        lambda url, progress=True: torch.load(path, weights_only=True),
    )
    ref = pytorch_fid_inception.InceptionV3([3], resize_input=False, normalize_input=True).eval()
    module, loaded = load_inception_fid(str(path))
    jax.tree.map(np.testing.assert_array_equal, loaded, variables)

    x01 = np.random.default_rng(1).uniform(0, 1, (2, 299, 299, 3)).astype(np.float32)
    with torch.no_grad():
        expected = nhwc(ref(nchw(x01))[0])[:, 0, 0]
    ours = np.asarray(jax.jit(module.apply)(loaded, x01 * 2 - 1))
    assert ours.shape == (2, 2048) and expected.std() > 0.01
    assert rel_err(ours, expected) <= 1e-4


def test_inception_weights_errors_name_the_file(tmp_path, inception_weights):
    with pytest.raises(FileNotFoundError, match='missing.pth not found.*pt_inception-2015-12-05'):
        load_inception_fid(str(tmp_path / 'missing.pth'))
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(inception_weights[1].read_bytes()[:100_000])
    with pytest.raises(ValueError, match='cannot read Inception weights .*truncated.pth.*complete'):
        load_inception_fid(str(truncated))


def test_clean_resize_matches_clean_fid():
    images = np.random.default_rng(2).integers(0, 256, (2, 40, 56, 3), dtype=np.uint8)
    reference = clean_fid_resize.make_resizer('PIL', False, 'bicubic', (299, 299))
    np.testing.assert_array_equal(fid.resize_for_inception(images, 'clean'), np.stack([reference(i) for i in images]))


def test_legacy_resize_matches_pytorch_fid_bilinear():
    """pytorch-fid resizes the [0, 1] tensor with F.interpolate(bilinear, align_corners=False)."""
    for size in (64, 512):  # up- and downsampling
        images = np.random.default_rng(size).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
        with torch.no_grad():
            expected = (
                nhwc(
                    F.interpolate(nchw(images / np.float32(255)), size=(299, 299), mode='bilinear', align_corners=False)
                )
                * 255
            )
        np.testing.assert_allclose(fid.resize_for_inception(images, 'legacy'), expected, atol=2e-3)


def test_features_take_uint8_only(inception_weights):
    features = fid.InceptionFeatures(InceptionV3FID(), inception_weights[0], batch_size=4)
    with pytest.raises(ValueError, match='uint8 RGB images'):
        features(np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match='unknown FID resize'):
        fid.InceptionFeatures(InceptionV3FID(), inception_weights[0], resize='bicubic')


def random_gaussian_stats(rng, dim: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    x = rng.standard_normal((n, dim)) @ rng.standard_normal((dim, dim)) + rng.standard_normal(dim)
    return x.mean(0), np.cov(x, rowvar=False)


def test_frechet_distance_equals_pytorch_fid_and_closed_forms():
    rng = np.random.default_rng(3)
    mu1, s1 = random_gaussian_stats(rng, 64, 500)
    mu2, s2 = random_gaussian_stats(rng, 64, 500)
    ours = fid.frechet_distance(mu1, s1, mu2, s2)
    assert ours > 1 and abs(ours - fid_score.calculate_frechet_distance(mu1, s1, mu2, s2)) <= 1e-6
    assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-6  # identical statistics
    # Diagonal covariances: ‖μ1 − μ2‖² + Σ (σ1 + σ2 − 2 √(σ1 σ2)).
    d1, d2 = rng.uniform(0.5, 2, 16), rng.uniform(0.5, 2, 16)
    m1, m2 = rng.standard_normal(16), rng.standard_normal(16)
    closed = ((m1 - m2) ** 2).sum() + (d1 + d2 - 2 * np.sqrt(d1 * d2)).sum()
    assert abs(fid.frechet_distance(m1, np.diag(d1), m2, np.diag(d2)) - closed) < 1e-9
    with pytest.raises(ValueError, match='statistics do not match'):
        fid.frechet_distance(mu1, s1, mu2[:10], s2[:10, :10])


def test_streaming_statistics_equal_batch_np_cov_and_combine_exactly():
    x = np.random.default_rng(4).standard_normal((301, 24)).astype(np.float32) * 3 + 1
    parts = [fid.GaussianStats(), fid.GaussianStats()]  # as two processes would hold them
    for i, chunk in enumerate(np.array_split(x, 7)):
        parts[i % 2].update(chunk)
    combined = parts[0]
    combined.count += parts[1].count
    combined.total, combined.outer = combined.total + parts[1].total, combined.outer + parts[1].outer
    mu, sigma = combined.all_processes().mean_and_cov()  # one process: the sums themselves
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match='dimension 5 added to statistics of 24'):
        combined.update(np.zeros((2, 5)))


# Each of two processes adds its own rows; both must end with the statistics of all rows, bit for bit
# the same, and gather every process's embeddings in process order.
_TWO_PROCESS_SCRIPT = """
import sys, jax, numpy as np
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from wurst_jax.evaluate import fid, gather
x = np.random.default_rng(0).standard_normal((101, 6)) * 3 + 1
lo, hi = (0, 40) if jax.process_index() == 0 else (40, 101)
stats = fid.GaussianStats()
stats.update(x[lo:hi])
mu, sigma = stats.all_processes().mean_and_cov()
rows = gather.allgather_rows(x[lo:hi].astype(np.float32))
np.savez(sys.argv[3], mu=mu, sigma=sigma, rows=rows)
"""


def test_statistics_and_rows_combine_across_two_processes(tmp_path):
    port, env = free_port(), dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
    procs = [
        subprocess.Popen(
            [sys.executable, '-c', _TWO_PROCESS_SCRIPT, f'127.0.0.1:{port}', str(i), str(tmp_path / f'{i}.npz')],
            cwd=REPO,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    x = np.random.default_rng(0).standard_normal((101, 6)) * 3 + 1
    results = [np.load(tmp_path / f'{i}.npz') for i in range(2)]
    for key in ('mu', 'sigma', 'rows'):
        np.testing.assert_array_equal(results[0][key], results[1][key])
    np.testing.assert_allclose(results[0]['mu'], x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(results[0]['sigma'], np.cov(x, rowvar=False), rtol=1e-10)
    np.testing.assert_array_equal(results[0]['rows'], x.astype(np.float32))


def test_statistics_files_round_trip_and_check_the_dimension(tmp_path):
    rng = np.random.default_rng(5)
    mu, sigma = random_gaussian_stats(rng, 8, 50)
    fid.save_stats(str(tmp_path / 'ref.npz'), mu, sigma)
    with np.load(tmp_path / 'ref.npz') as f:  # what pytorch-fid and clean-fid read
        np.testing.assert_array_equal(f['mu'], mu)
        np.testing.assert_array_equal(f['sigma'], sigma)
    assert fid.load_stats(str(tmp_path / 'ref.npz'), dim=8)['mu'].shape == (8,)
    with pytest.raises(ValueError, match='ref.npz has mu \\(8,\\).*another feature layer'):
        fid.load_stats(str(tmp_path / 'ref.npz'))
    with pytest.raises(FileNotFoundError, match='reference_stats'):
        fid.load_stats(str(tmp_path / 'none.npz'))


TINY_CLIP = dict(
    text_config=dict(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
    ),
    vision_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=30, patch_size=6
    ),
    projection_dim=16,
)


@pytest.fixture(scope='module')
def clip_folder(tmp_path_factory):
    """A random tiny transformers CLIPModel saved with its tokenizer, as a hub folder is."""
    path = tmp_path_factory.mktemp('clip')
    tiny_clip_tokenizer_folder(path, '!')
    tokenizer = transformers.CLIPTokenizer.from_pretrained(path)
    config = transformers.CLIPConfig(
        **{
            **TINY_CLIP,
            'text_config': {
                **TINY_CLIP['text_config'],
                'vocab_size': len(tokenizer),
                'eos_token_id': tokenizer.eos_token_id,
                'pad_token_id': tokenizer.pad_token_id,
                'bos_token_id': tokenizer.bos_token_id,
            },
        }
    )
    randomise(transformers.CLIPModel(config), seed=0).save_pretrained(path)
    return path


def clip_image_processor(size: int, backend=transformers.CLIPImageProcessorPil):
    """transformers' CLIP preprocessing (shorter side to `size` bicubic, centre crop, CLIP mean/std) at `size`."""
    return backend(size={'shortest_edge': size}, crop_size={'height': size, 'width': size})


def test_clip_embeddings_and_scores_match_transformers(clip_folder):
    prompts = ['a photo of the cat', 'the dog', 'a cat of a dog, the photo']
    images = np.random.default_rng(6).integers(0, 256, (3, 37, 52, 3), dtype=np.uint8)  # raw, not square
    embedder = clip_metrics.CLIPEmbedder(str(clip_folder), batch_size=2)  # 2: a padded last batch
    image_embeds, text_embeds = embedder.image_embeds(images), embedder.text_embeds(prompts)

    ref = transformers.CLIPModel.from_pretrained(clip_folder).eval()
    tokens = transformers.CLIPTokenizer.from_pretrained(clip_folder)(
        prompts, padding='max_length', max_length=77, return_tensors='pt'
    )
    pixels = clip_image_processor(30)(list(images), return_tensors='pt')['pixel_values']
    with torch.no_grad():
        out = ref(input_ids=tokens['input_ids'], attention_mask=tokens['attention_mask'], pixel_values=pixels)
    assert rel_err(image_embeds, out.image_embeds.numpy()) < 1e-4
    assert rel_err(text_embeds, out.text_embeds.numpy()) < 1e-4

    cos = torch.diagonal(out.logits_per_image / ref.logit_scale.exp()).detach().numpy().astype(np.float64)
    np.testing.assert_allclose((image_embeds * text_embeds).sum(-1), cos, atol=1e-5)
    assert clip_metrics.clip_score(cos, 'torchmetrics') == pytest.approx(max(100 * cos.mean(), 0))
    assert clip_metrics.clip_score(cos, 'hessel') == pytest.approx(np.mean(2.5 * np.clip(cos, 0, None)))
    assert clip_metrics.clip_score(cos, 'cosine') == pytest.approx(cos.mean())
    assert clip_metrics.clip_score(np.array([-0.2, 0.1]), 'torchmetrics') == 0.0  # the mean is clamped
    assert clip_metrics.clip_score(np.array([-0.2, 0.1]), 'hessel') == pytest.approx(0.125)  # each pair is
    with pytest.raises(ValueError, match='unknown CLIP score convention'):
        clip_metrics.clip_score(cos, 'clipscore')


@pytest.mark.parametrize('shape', [(37, 61), (80, 45), (19, 19), (233, 500), (30, 31)])
def test_clip_preprocessing_matches_clip_image_processor(shape):
    """'clip' is transformers' CLIPImageProcessor on raw uint8 images of odd sizes and aspect ratios (upscaled
    and downscaled): exactly its PIL backend, within one uint8 level its torchvision backend."""
    image = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    ours = clip_metrics.preprocess(image[None], 30)[0]
    expected = clip_image_processor(30)(image, return_tensors='np')['pixel_values'][0].transpose(1, 2, 0)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)
    torchvision_backend = clip_image_processor(30, transformers.CLIPImageProcessor)
    close = torchvision_backend(image, return_tensors='np')['pixel_values'][0].transpose(1, 2, 0)
    assert np.abs(ours - close).max() <= 1.001 / 255 / min(transformers.image_utils.OPENAI_CLIP_STD)


@pytest.mark.parametrize('shape', [(37, 61), (233, 500), (19, 19)])
def test_cmmd_preprocessing_matches_cmmd_reference(shape):
    """'cmmd' is google-research cmmd/io_util.py `_center_crop_and_resize` (PIL crop box, then PIL bicubic
    to 336, ViT-L/14@336's size), /255, then CLIP's mean/std (scenic `normalize_image`, in embedding.py)."""
    image = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    im = Image.fromarray(image)
    w, h = im.size
    side = min(w, h)
    top, left = (h - side) // 2, (w - side) // 2
    im = im.crop((left, top, left + side, top + side)).resize((336, 336), resample=Image.BICUBIC)
    mean, std = np.array(transformers.image_utils.OPENAI_CLIP_MEAN), np.array(transformers.image_utils.OPENAI_CLIP_STD)
    expected = (np.asarray(im).astype(np.float32) / 255.0 - mean) / std
    np.testing.assert_allclose(clip_metrics.preprocess(image[None], 336, 'cmmd')[0], expected, rtol=0, atol=1e-6)
    if shape[0] == shape[1]:  # on squares both orders are the same pixels
        np.testing.assert_array_equal(
            clip_metrics.preprocess(image[None], 336, 'cmmd'), clip_metrics.preprocess(image[None], 336)
        )
    with pytest.raises(ValueError, match='unknown CLIP preprocessing'):
        clip_metrics.preprocess(image[None], 336, 'openai')


def test_cmmd_equals_direct_numpy():
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((40, 16)) * 4, rng.standard_normal((30, 16)) * 4 + 1

    def mean_kernel(a, b, sigma=10.0):
        d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return np.exp(-d2 / (2 * sigma**2)).mean()

    expected = 1000 * (mean_kernel(x, x) + mean_kernel(y, y) - 2 * mean_kernel(x, y))
    assert expected > 1
    assert clip_metrics.cmmd(x, y) == pytest.approx(expected, rel=1e-4)
    assert abs(clip_metrics.cmmd(x, x)) < 1e-3
    with pytest.raises(ValueError, match='one dimension'):
        clip_metrics.cmmd(x, y[:, :8])


def test_clip_folder_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match='config.json not found.*CLIPModel folder'):
        clip_metrics.CLIPEmbedder(str(tmp_path))


# -- The job on the demo run ----------------------------------------------------------------------


@pytest.fixture(scope='module')
def eval_files(tmp_path_factory, inception_weights, clip_folder):
    """Prompts, Inception weights as .safetensors, and reference statistics with CLIP embeddings made by
    the reference_stats CLI from a folder of 7 images, one of them corrupt."""
    root = tmp_path_factory.mktemp('eval_files')
    weights = root / 'inception.safetensors'
    save_file(core.state_dict_from_variables(InceptionV3FID(), 'inception_fid', inception_weights[0]), weights)
    images = root / 'real'
    images.mkdir()
    rng = np.random.default_rng(8)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(images / f'{i}.png')
    (images / 'broken.png').write_bytes(b'\x89PNG not really')
    result = run_module(
        'wurst_jax.evaluate.reference_stats',
        f'--images={images}',
        f'--out={root / "ref.npz"}',
        f'--inception_weights={weights}',
        f'--clip_weights={clip_folder}',
        '--image_size=32',
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary['num_images'] == 6 and summary['num_skipped'] == 1 and 'broken.png' in summary['skipped'][0]
    prompts = root / 'prompts.txt'
    prompts.write_text('a red circle on the left\na blue square at the top\na green triangle on the right\n')
    return {'prompts': prompts, 'inception': weights, 'reference': root / 'ref.npz', 'clip': clip_folder}


def grid_images(path, count: int) -> np.ndarray:
    """The `count` images of a one-row grid.png (visualize.image_grid: 2 px padding around each)."""
    grid = np.asarray(Image.open(path))
    h, w = grid.shape[0] - 4, (grid.shape[1] - 2) // count - 2
    return np.stack([grid[2 : 2 + h, 2 + i * (w + 2) : 2 + i * (w + 2) + w] for i in range(count)])


def eval_config(demo_root, files, out_dir, **fields):
    config = load_config('eval')
    config.update(
        {
            'workdir': str(demo_root),
            'prompts': str(files['prompts']),
            'out_dir': str(out_dir),
            'prior_steps': 2,
            'decoder_steps': 2,
            'batch_size': 4,
            **fields,
        }
    )
    return config


def test_eval_job_scores_the_demo_run(demo_root, eval_files, tmp_path):
    steps = checkpoint.all_steps(demo_root / 'stage_c')
    out = tmp_path / 'eval'
    result = run_module(
        'wurst_jax.evaluate',
        '--config=configs/eval.py',
        f'--config.workdir={demo_root}',
        f'--config.prompts={eval_files["prompts"]}',
        f'--config.out_dir={out}',
        f'--config.reference_stats={eval_files["reference"]}',
        f'--config.inception_weights={eval_files["inception"]}',
        f'--config.clip_weights={eval_files["clip"]}',
        '--config.prior_steps=2',
        '--config.decoder_steps=2',
        '--config.batch_size=4',
    )
    assert result.returncode == 0, result.stderr[-3000:]
    printed = [json.loads(line) for line in result.stdout.strip().splitlines() if line.startswith('{')]
    assert len(steps) >= 2 and [p['step'] for p in printed] == steps  # every checkpoint, oldest first
    # The scores are recomputed from the images in grid.png (all three, lossless): FID by pytorch-fid
    # from np.mean / np.cov of their features, CMMD and the shapes alignment from the same images.
    reference = fid.load_stats(str(eval_files['reference']))
    inception = fid.InceptionFeatures(*load_inception_fid(str(eval_files['inception'])), resize='clean', batch_size=4)
    embedder = clip_metrics.CLIPEmbedder(str(eval_files['clip']), batch_size=4)
    prompts = eval_files['prompts'].read_text().splitlines()
    for step in steps:
        metrics = json.loads((out / str(step) / 'metrics.json').read_text())
        assert metrics['step'] == step and metrics['num_images'] == 3
        scores = metrics['metrics']
        images = grid_images(out / str(step) / 'grid.png', count=3)
        features = inception(images)
        assert scores['fid'] == pytest.approx(
            fid_score.calculate_frechet_distance(
                features.mean(0), np.cov(features, rowvar=False), reference['mu'], reference['sigma']
            ),
            rel=1e-4,
        )
        assert scores['cmmd'] == pytest.approx(
            clip_metrics.cmmd(embedder.image_embeds(images), reference['clip_embeds']), rel=1e-4
        )
        alignment = shapes_alignment.evaluate(images, prompts)
        assert {k: scores[k] for k in alignment} == alignment and 'clip_score_torchmetrics' in scores
        assert metrics['skipped'] == {} and metrics['conventions']['fid_resize'] == 'clean'
        assert (out / str(step) / 'grid.png').is_file() and (out / str(step) / 'generated_stats.npz').is_file()
    # Each step samples with its own params: the job swaps them into one pipeline (the demo's few
    # steps move them by ~1e-3, too little to change its 2+2-step uint8 images reliably).
    pipeline = Pipeline.from_root(str(demo_root), prior_step=steps[0])
    pipeline.load_prior_step(steps[-1])
    _, last = checkpoint.load_trained(str(demo_root / 'stage_c'), steps[-1])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(pipeline.prior_params), last['ema_params'])
    _, first = checkpoint.load_trained(str(demo_root / 'stage_c'), steps[0])
    assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, first['ema_params'], last['ema_params'])))
    assert list(out.glob('events.out.tfevents.*'))

    # Scored steps are not scored again; a finished run ends the job, a running one is waited for.
    config = eval_config(demo_root, eval_files, out, follow=True)
    assert checkpoint.is_complete(demo_root / 'stage_c') and job.next_step(config) == job._DONE
    marker = demo_root / 'stage_c' / checkpoint.COMPLETE_MARKER
    saved = marker.read_text()
    marker.unlink()
    try:
        assert job.next_step(config) == job._WAIT
    finally:
        marker.write_text(saved)


def test_eval_job_without_weights_skips_metrics_and_says_why(demo_root, eval_files, tmp_path):
    config = eval_config(demo_root, eval_files, tmp_path / 'eval')
    scorers = job.Scorers(config)
    assert set(scorers.skipped) == {'fid', 'clip_score', 'cmmd'} and 'inception_weights' in scorers.skipped['fid']
    assert job.Scorers(
        eval_config(
            demo_root,
            eval_files,
            tmp_path,
            inception_weights=str(eval_files['inception']),
            clip_weights=str(eval_files['clip']),
        )
    ).skipped == {
        'fid': 'no reference_stats given (the generated statistics are saved)',
        'cmmd': 'reference_stats hold no clip_embeds (make them with --clip_weights)',
    }


def test_eval_job_bad_input_names_the_field(demo_root, eval_files, tmp_path):
    def error(**fields):
        with pytest.raises((ConfigError, SystemExit)) as info:
            job.run(eval_config(demo_root, eval_files, tmp_path / 'eval', **fields))
        return str(info.value)

    assert 'config.inception_weights' in error(inception_weights=str(tmp_path / 'missing.pth'))
    assert 'config.clip_weights' in error(clip_weights=str(tmp_path / 'no_clip'))
    assert 'config.clip_score' in error(clip_score='clipscore')
    (tmp_path / 'empty.txt').write_text('\n\n')
    assert 'has no prompts' in error(prompts=str(tmp_path / 'empty.txt'))
    (tmp_path / 'run' / 'stage_b').mkdir(parents=True)
    (tmp_path / 'run' / 'stage_c').mkdir()
    assert 'stage_b/ has no checkpoint' in error(workdir=str(tmp_path / 'run'))
    assert 'config.workdir' in error(workdir=str(tmp_path / 'nowhere'))
    bad_stats = tmp_path / 'bad.npz'
    fid.save_stats(str(bad_stats), np.zeros(64), np.eye(64))
    with pytest.raises(ValueError, match='bad.npz has mu \\(64,\\)'):
        job.Scorers(eval_config(demo_root, eval_files, tmp_path, reference_stats=str(bad_stats)))


# -- A root trained by older code ---------------------------------------------------------------

# Fields the configs saved by older code lack (configs/shapes.py when the sampling pipeline landed),
# those whose value then is today's default: `defaults.upgrade` fills them in.
OLDER_LAYOUT = {
    'stage_b': ('diffusion.p2_k', 'diffusion.prediction', 'model.remat_policy'),
    'stage_c': (
        'diffusion.p2_k',
        'init',
        'latents',
        'model.backbone',
        'model.micro_conditions',
        'model.patch_size',
        'stage_a',
    ),
}


@pytest.fixture(scope='module')
def older_root(demo_root, tmp_path_factory):
    """A copy of demo_root whose saved configs have the older layout (and name the copy's stages)."""
    root = tmp_path_factory.mktemp('older') / 'root'
    shutil.copytree(demo_root, root)
    for stage, fields in OLDER_LAYOUT.items():
        saved_configs = list((root / stage / 'checkpoints').glob('*/config/metadata'))
        assert saved_configs
        for path in saved_configs:
            saved = json.loads(path.read_text().replace(str(demo_root), str(root)))
            for field in fields:
                *sections, name = field.split('.')
                del functools.reduce(dict.__getitem__, sections, saved)[name]
            path.write_text(json.dumps(saved))
    return root


def test_a_root_saved_by_older_code_samples_as_before_and_evaluates(demo_root, older_root, eval_files, tmp_path):
    prompts = eval_files['prompts'].read_text().splitlines()
    options = dict(seed=3, prior_steps=2, decoder_steps=2)
    np.testing.assert_array_equal(
        Pipeline.from_root(str(older_root))(prompts, **options), Pipeline.from_root(str(demo_root))(prompts, **options)
    )
    # The job scores the older root: its pipeline reads the upgraded configs.
    older = job.run(eval_config(older_root, eval_files, tmp_path / 'older'))
    assert [r['step'] for r in older] == checkpoint.all_steps(older_root / 'stage_c')
    assert all(r['num_images'] == len(prompts) and 'colour_accuracy' in r['metrics'] for r in older)


def test_a_run_saved_by_older_code_resumes(older_root):
    workdir = older_root / 'stage_c'
    config = load_config('shapes', f'stage=c,root={older_root},runlocal')
    config.input.data_dir = str(older_root / 'data')
    demo.check_resumable(config, str(workdir))  # the upgraded saved config is this one
    last = max(checkpoint.all_steps(workdir))
    config.total_steps = last + 1
    state = train.train_and_evaluate(config, str(workdir))
    assert int(state.step) == last + 1 and max(checkpoint.all_steps(workdir)) == last + 1
