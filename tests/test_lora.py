"""LoRA (configs/wuerstchen_v2_prior_lora.py on tiny random folders): adapters start as a no-op, train
alone on a frozen base whose weight gradients the compiled step drops, resume exactly, refuse a changed
base, and export to what diffusers' load_lora_weights reads; a LoRA file starts a run, and
configs/wuerstchen_v2_decoder_lora.py trains adapters on a converted Stage B decoder."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from conftest import load_config, run_module, small_prior_run_config
from wurst_jax import checkpoint, config_lib, convert, lora, lowering, sharding, tasks, train
from wurst_jax.convert import core
from wurst_jax.convert import lora as lora_format
from wurst_jax.tasks.lora_task import BASE
from wurst_jax.train_state import example_batch


def lora_config(finetune_arg, tmp_path, **lora_fields):
    config = small_prior_run_config('wuerstchen_v2_prior_lora', finetune_arg, tmp_path / 'data')
    config.lora.update(lora_fields)
    return config


def random_batch(task, size: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    batch = {}
    for k, v in example_batch(task, size).items():
        batch[k] = (
            jnp.asarray(rng.uniform(-1, 1, v.shape), v.dtype) if v.dtype == jnp.float32 else jnp.ones(v.shape, v.dtype)
        )
    return batch


@pytest.fixture(scope='module')
def lora_task(finetune_arg, tmp_path_factory):
    config = lora_config(finetune_arg, tmp_path_factory.mktemp('lora'))
    tasks.validate(config)
    task = tasks.create(config)
    params, model_state = jax.jit(task.init)(jax.random.PRNGKey(0), example_batch(task, 1))
    return task, nn.meta.unbox(params), model_state, nn.meta.unbox(task.frozen_params())


def prior_out(task, prior_params, seed=0):
    x = jax.random.normal(jax.random.PRNGKey(seed), (2, 8, 8, 4))
    cond = jax.random.normal(jax.random.PRNGKey(seed + 1), (2, 77, 32))
    return task.inner.prior.apply({'params': prior_params}, x, jnp.array([0.3, 0.8]), cond)


def test_adapters_start_as_the_base_and_merge_into_the_same_function(lora_task):
    task, params, _, frozen = lora_task
    base = frozen[BASE]
    attached = lora.attach(base, params['lora'])
    with lora.adapted(task.scale):
        np.testing.assert_array_equal(prior_out(task, attached['prior']), prior_out(task, base['prior']))
    # Trained adapters (random lora_b): the low-rank branch changes the output, and merging it into
    # the kernels gives the same function.
    trained = jax.tree.map(
        lambda a: a if a.ndim < 3 else 0.3 * jax.random.normal(jax.random.PRNGKey(a.size), a.shape), params['lora']
    )
    with lora.adapted(task.scale):
        adapted = prior_out(task, lora.attach(base, trained)['prior'])
    merged = prior_out(task, lora.merge(base, trained, task.scale)['prior'])
    assert float(jnp.abs(adapted - prior_out(task, base['prior'])).max()) > 1e-3
    np.testing.assert_allclose(adapted, merged, atol=1e-5, rtol=1e-5)


def test_step_gradients_are_the_adapters_only_and_the_loss_is_the_bases(lora_task):
    task, params, model_state, frozen = lora_task
    batch, rng = random_batch(task, 2), jax.random.PRNGKey(3)
    grads, _, metrics = jax.jit(task.grads)(params, model_state, frozen, batch, rng, 0)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    inner_frozen = {k: v for k, v in frozen.items() if k != BASE}
    _, _, base_metrics = jax.jit(task.inner.grads)(frozen[BASE], model_state, inner_frozen, batch, rng, 0)
    assert float(metrics['loss']) == float(base_metrics['loss'])
    flat = traverse_util.flatten_dict(grads)
    # lora_b starts at zero, so lora_a's gradient is zero at first; lora_b's is not.
    assert all(float(jnp.abs(g).max()) > 0 for k, g in flat.items() if k[-1] == lora.B)


def test_compiled_step_has_no_base_weight_gradients(finetune_arg, tmp_path):
    """Full fine-tune minus LoRA FLOPs is the prior's weight gradients: about one forward pass of it."""
    flops, memory = {}, {}
    for name in ('wuerstchen_v2_prior_finetune', 'wuerstchen_v2_prior_lora'):
        config = small_prior_run_config(name, finetune_arg, tmp_path / 'data')
        config.mesh.update(data=1, fsdp=1, tensor=1)
        lowered, _ = lowering.lower_from_shapes(config, sharding.create_mesh(config.mesh, jax.devices('cpu')[:1]))
        flops[name] = lowering.step_flops(config, lowered)
        memory[name] = lowered.compile().memory_analysis()
    task = tasks.create(small_prior_run_config('wuerstchen_v2_prior_lora', finetune_arg, tmp_path / 'data'))
    x = jnp.zeros((config.input.batch_size, 8, 8, 4))
    cond = jnp.zeros((config.input.batch_size, 77, 32))
    forward = jax.jit(lambda p: task.inner.prior.apply({'params': p}, x, jnp.zeros((x.shape[0],)), cond))
    prior_forward = forward.lower(nn.meta.unbox(task.frozen_params())[BASE]['prior']).cost_analysis()['flops']
    saved = flops['wuerstchen_v2_prior_finetune'] - flops['wuerstchen_v2_prior_lora']
    assert 0.9 * prior_forward < saved < 1.2 * prior_forward, (flops, prior_forward)
    # No optimizer state or updated params for the base: the step's outputs are the adapters' state.
    full, low = memory['wuerstchen_v2_prior_finetune'], memory['wuerstchen_v2_prior_lora']
    assert low.output_size_in_bytes < 0.25 * full.output_size_in_bytes


@pytest.mark.parametrize(
    'fields, match',
    [
        (dict(rank=64), r'lora\.rank=64.*at most min\(in, out\) = 16'),
        (dict(targets='nothing_like_this'), r'lora\.targets.*match kernel paths'),
        (dict(targets='prior/.*/depthwise/kernel'), r'lora\.targets.*dense or 1x1 conv kernels'),
        (dict(alpha=0.0), r'lora\.alpha'),
        (dict(base_dtype='float16'), r'lora\.base_dtype'),
    ],
)
def test_bad_lora_fields_are_config_errors(finetune_arg, tmp_path, fields, match):
    config = lora_config(finetune_arg, tmp_path, **fields)
    with pytest.raises(config_lib.ConfigError, match=match):
        tasks.validate(config)
        jax.eval_shape(tasks.create(config).init, jax.random.PRNGKey(0), example_batch(tasks.create(config), 1))


def test_a_base_of_another_shape_is_refused_naming_it(finetune_arg, lora_task, tmp_path):
    task, _, _, frozen = lora_task
    wrong = jax.tree.map(np.asarray, frozen[BASE])
    wrong['prior']['projection']['kernel'] = np.zeros((1, 1, 4, 8), np.float32)
    other = tmp_path / 'other'
    manager = checkpoint.create_manager(str(other / 'checkpoints'), max_to_keep=1)
    manager.save(
        1,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave({'ema_params': wrong}), config=ocp.args.JsonSave(task.config.to_dict())
        ),
    )
    manager.wait_until_finished()
    config = lora_config(finetune_arg, tmp_path, base=str(other))
    with pytest.raises(config_lib.ConfigError, match=r'lora\.base.*other shapes.*prior/projection/kernel'):
        tasks.create(config).frozen_params()


@pytest.fixture(scope='module')
def lora_run(finetune_arg, tmp_path_factory):
    """(workdir, config) of a 3-step LoRA run of the tiny prior."""
    root = tmp_path_factory.mktemp('lora_run')
    config = lora_config(finetune_arg, root)
    config.total_steps = 3
    train.train_and_evaluate(config, str(root / 'run'))
    return str(root / 'run'), config


def test_lora_run_trains_adapters_resumes_exactly_and_refuses_a_changed_base(
    finetune_arg, lora_task, lora_run, tmp_path
):
    base_prior = jax.tree.map(np.asarray, lora_task[3][BASE])
    workdir, straight = lora_run
    _, state = checkpoint.load_trained(workdir)
    assert set(state['params']) == {'lora'} and set(state['ema_params']) == {'lora'}
    assert any(float(np.abs(b).max()) > 0 for b in jax.tree.leaves(state['params']['lora']))
    assert os.path.exists(os.path.join(workdir, 'lora_base.json'))

    resumed = lora_config(finetune_arg, tmp_path)
    resumed.total_steps = 2
    train.train_and_evaluate(resumed, str(tmp_path / 'resumed'))
    resumed.total_steps = 3
    train.train_and_evaluate(resumed, str(tmp_path / 'resumed'))
    _, again = checkpoint.load_trained(str(tmp_path / 'resumed'))
    for part in ('params', 'ema_params', 'opt_state'):
        jax.tree.map(np.testing.assert_array_equal, again[part], state[part])

    # Sampling and evaluation see the base merged with the EMA adapters; the base files are untouched.
    _, merged, _ = tasks.load_trained(workdir, 'stage_c')
    expect = lora.merge(base_prior, state['ema_params']['lora'], lora.scale(straight))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), merged, expect)
    jax.tree.map(np.testing.assert_array_equal, lora_task[0].base(), base_prior)

    changed = lora_config(finetune_arg, tmp_path, base_dtype='bfloat16')  # another base: its bytes differ
    changed.total_steps = 4
    with pytest.raises(config_lib.ConfigError, match=r'lora\.base.*the base this run.*trained on'):
        train.train_and_evaluate(changed, str(tmp_path / 'resumed'))


def test_export_loads_in_diffusers_with_the_same_outputs(finetune_arg, lora_run, tmp_path):
    """The adapter file through WuerstchenPriorPipeline.load_lora_weights, the merged export through
    from_pretrained, and ours, give the same prior output; the file reads back to the same adapters."""
    import torch
    from diffusers import DDPMWuerstchenScheduler
    from diffusers.pipelines.deprecated.wuerstchen import WuerstchenPrior, WuerstchenPriorPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    workdir, config = lora_run
    folders = dict(item.split('=') for item in finetune_arg.split(','))
    for out, merge in (('adapter', '--nomerge'), ('merged', '--merge')):  # the CLI, in its own process (absl flags)
        result = run_module('wurst_jax.export', f'--workdir={workdir}', f'--out={tmp_path / out}', merge)
        assert result.returncode == 0, result.stderr[-3000:]
    pipe = WuerstchenPriorPipeline(
        tokenizer=CLIPTokenizer.from_pretrained(folders['clip']),
        text_encoder=CLIPTextModel.from_pretrained(folders['clip']),
        prior=WuerstchenPrior.from_pretrained(folders['prior']),
        scheduler=DDPMWuerstchenScheduler(),
    )
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 8, 4)).astype(np.float32)
    r, c = np.array([0.2, 0.7], np.float32), rng.standard_normal((2, 5, 32)).astype(np.float32)

    def torch_prior(prior):
        with torch.no_grad():
            out = prior(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(r), torch.from_numpy(c))
        return out.numpy().transpose(0, 2, 3, 1)

    before = torch_prior(pipe.prior)
    pipe.load_lora_weights(str(tmp_path / 'adapter'))
    with_lora = torch_prior(pipe.prior)
    task, merged, _ = tasks.load_trained(workdir, 'stage_c')
    ours = np.asarray(jax.jit(task.prior.apply)({'params': merged['prior']}, x, r, c))
    assert float(np.abs(with_lora - before).max()) > 1e-4  # the adapters are trained: the file changes the prior
    np.testing.assert_allclose(with_lora, ours, atol=1e-5, rtol=1e-5)
    # Each folder of the merged export loads with its class's from_pretrained (diffusers 0.42's
    # WuerstchenPriorPipeline.from_pretrained cannot resolve the deprecated WuerstchenPrior class by itself).
    merged = tmp_path / 'merged'
    merged_pipe = WuerstchenPriorPipeline(
        tokenizer=CLIPTokenizer.from_pretrained(merged / 'tokenizer'),
        text_encoder=CLIPTextModel.from_pretrained(merged / 'text_encoder'),
        prior=WuerstchenPrior.from_pretrained(merged / 'prior'),
        scheduler=DDPMWuerstchenScheduler.from_pretrained(merged / 'scheduler'),
    )
    assert json.loads((merged / 'model_index.json').read_text())['latent_mean'] == 42.0
    np.testing.assert_allclose(torch_prior(merged_pipe.prior), with_lora, atol=1e-5, rtol=1e-5)

    lora_task = tasks.create(config)
    state = core.read_safetensors(str(tmp_path / 'adapter' / lora_format.LORA_WEIGHTS))
    base = lora_task.base()['prior']
    read = lora_format.from_diffusers(task.prior, 'prior', base, state, 'prior')
    trained = checkpoint.load_params(workdir, ema=True)['lora']['prior']
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7),
        lora.merge(base, read, 1.0),
        lora.merge(base, trained, lora_task.scale),
    )
    with pytest.raises(ValueError, match=r'no prior\.\*\.lora_A'):
        lora_format.from_diffusers(task.prior, 'prior', base, {'unet.x.lora_A.weight': np.zeros(1)}, 'prior')


def test_a_run_starts_from_a_lora_file(finetune_arg, lora_run, tmp_path):
    """lora.init_from: the adapters of a file (here one written from a trained run) are where a new run
    starts, as the same function; a file of another rank or other targets is refused naming the field."""
    from safetensors.numpy import save_file

    workdir, config = lora_run
    task = tasks.create(config)
    base, trained = task.base()['prior'], checkpoint.load_params(workdir, ema=True)['lora']['prior']
    file = str(tmp_path / 'trained.safetensors')
    save_file(lora_format.to_diffusers(task.inner.prior, 'prior', base, trained, task.scale, 'prior'), file)

    started = lora_config(finetune_arg, tmp_path, init_from=file, alpha=2.0)  # another alpha: the same function
    started.total_steps, started.optimizer.lr = 1, 1e-12  # one step that moves nothing measurable
    loaded = tasks.create(started).pretrained_params()['lora']['prior']
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
        lora.merge(base, loaded, lora.scale(started)),
        lora.merge(base, trained, task.scale),
    )
    train.train_and_evaluate(started, str(tmp_path / 'started'))
    _, state = checkpoint.load_trained(str(tmp_path / 'started'))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), state['params']['lora']['prior'], loaded)

    for fields, match in (
        (dict(rank=2), r'lora\.rank=2.*the rank of the adapters in lora\.init_from, \[4\]'),
        (dict(targets='feed_forward'), r'lora\.targets.*every module lora\.init_from adapts'),
    ):
        with pytest.raises(config_lib.ConfigError, match=match):
            tasks.create(lora_config(finetune_arg, tmp_path, init_from=file, **fields)).pretrained_params()
    for fields, match in (
        (dict(init_from=str(tmp_path / 'missing.safetensors')), r'lora\.init_from.*an existing LoRA file'),
        (dict(init_from=file, rank=0), r"lora\.init_from.*set lora\.rank to the file's rank"),
    ):
        with pytest.raises(config_lib.ConfigError, match=match):
            tasks.validate(lora_config(finetune_arg, tmp_path, **fields))


def test_stage_b_lora_config_trains_adapters_on_a_converted_decoder(finetune_arg, tiny_stage_folders, tmp_path):
    """configs/wuerstchen_v2_decoder_lora.py: the base is the decoder of a diffusers folder, the run trains
    and saves adapters only, and they convert to decoder.* LoRA keys and back."""
    folders = dict(item.split('=') for item in finetune_arg.split(','))
    arg = (
        f'vqgan={tiny_stage_folders["vqgan"]},effnet={tiny_stage_folders["effnet"]},clip={folders["clip"]},'
        f'images={folders["images"]},batch=8,res=32,steps=1'
    )

    def tiny(decoder_folder=''):
        config = load_config('wuerstchen_v2_decoder_lora', f'{arg},decoder={decoder_folder}' if decoder_folder else arg)
        config.dtype, config.input.data_dir = 'float32', str(tmp_path / 'data')
        config.model.update(c_hidden=[16, 32], nhead=[-1, 2], blocks=[1, 1], level_config=['CT', 'CTA'])
        config.model.update(inject_effnet=[False, True], c_cond=16, c_r=8, dropout=0.0, remat_policy='none')
        config.optimizer.warmup_steps = 0
        config.eval.update(num_examples=8, batch_size=8, num_grid_images=2, grid_columns=2)
        config.sample.decoder_steps = 2
        config.log_every_steps = config.image_every_steps = config.checkpoint_every_steps = 1
        return config

    fresh = tasks.create(tiny())  # the architecture to save, from config.model
    params = nn.meta.unbox(jax.jit(fresh.inner.init)(jax.random.PRNGKey(3), example_batch(fresh, 1))[0])
    convert.save_diffusers(fresh.inner.decoder, {'params': params['decoder']}, str(tmp_path / 'decoder'), 'decoder')

    config = tiny(str(tmp_path / 'decoder'))
    tasks.validate(config)
    train.train_and_evaluate(config, str(tmp_path / 'run'))
    _, state = checkpoint.load_trained(str(tmp_path / 'run'))
    assert set(state['params']) == {'lora'} and set(state['params']['lora']) == {'decoder'}
    assert any('to_q' in '/'.join(k) for k in traverse_util.flatten_dict(state['params']['lora']))
    record = json.loads((tmp_path / 'run' / 'lora_base.json').read_text())
    assert record['source'] == str(tmp_path / 'decoder')
    task = tasks.create(config)
    jax.tree.map(np.testing.assert_allclose, task.base()['decoder'], params['decoder'])

    trained = state['ema_params']['lora']['decoder']
    file = lora_format.to_diffusers(
        task.inner.decoder, 'decoder', task.base()['decoder'], trained, task.scale, 'decoder'
    )
    assert file and all(k.startswith('decoder.') for k in file)
    read = lora_format.from_diffusers(task.inner.decoder, 'decoder', task.base()['decoder'], file, 'decoder')
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
        lora.merge(task.base()['decoder'], read, 1.0),
        lora.merge(task.base()['decoder'], trained, task.scale),
    )
    bad = tiny(str(tmp_path / 'missing'))
    with pytest.raises(config_lib.ConfigError, match=r'init\.decoder.*a converted decoder'):
        tasks.validate(bad)
