"""`wurst_jax.plan` (ahead-of-time compile of the train step) and per-block remat.

The frozen networks are model folders holding only config.json: the plan must never need weights.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import app

from conftest import REPO, load_config
from wurst_jax import lowering, plan, sharding, tasks
from wurst_jax.convert import core
from wurst_jax.models.clip import CLIPTextModel
from wurst_jax.models.effnet import EfficientNetEncoder
from wurst_jax.models.stage_a import VQGAN
from wurst_jax.models.stage_b import WuerstchenDiffNeXt
from wurst_jax.models.stage_c import WuerstchenPrior
from wurst_jax.models.t5 import T5Encoder


@pytest.fixture(scope='module')
def stage_c_arg(tmp_path_factory):
    """configs/stage_c.py's argument naming config-only CLIP and effnet folders made here."""
    tmp = tmp_path_factory.mktemp('plan')
    core.write_config(
        CLIPTextModel(
            vocab_size=300,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=8,
            hidden_act='gelu',
        ),
        str(tmp / 'clip'),
        'clip_text',
    )
    core.write_config(
        EfficientNetEncoder(
            stages=(('fused', 1, 3, 2, 8, 8, 1), ('mb', 2, 3, 2, 8, 16, 1)), last_channels=16, c_latent=4
        ),
        str(tmp / 'effnet'),
        'effnet',
    )
    assert sorted(os.listdir(tmp / 'clip')) == ['config.json']
    return f'clip={tmp / "clip"},effnet={tmp / "effnet"},batch=16'


def _tiny_stage_c(arg, **model):
    config = load_config('stage_c', arg)
    config.text.max_length = 8
    config.input.update(image_size=32, resize=32)
    config.effnet.image_size = 32
    config.model.update({**dict(c=32, depth=2, num_heads=2, c_r=8, scan_blocks=False), **model})
    return plan.plan_config(config, {}, 0)


def test_fsdp_splits_state_and_remat_cuts_activations(stage_c_arg):
    """On 8 fake devices: FSDP holds well under half the float32 state (params, EMA, two Adam moments)
    per device, and full remat needs fewer temporary bytes than keeping every activation."""

    def run(**model):
        config = _tiny_stage_c(stage_c_arg, depth=4, scan_blocks=True, **model)
        config.mesh.update(data=1, fsdp=8)
        return plan.plan(config, jax.devices())

    kept, remat = run(remat_policy='none'), run(remat_policy='full')
    prior = WuerstchenPrior(c_in=4, c=32, c_cond=32, c_r=8, depth=4, num_heads=2)
    count = sum(
        x.size
        for x in jax.tree.leaves(
            jax.eval_shape(
                prior.init, jax.random.key(0), jnp.zeros((1, 2, 2, 4)), jnp.zeros((1,)), jnp.zeros((1, 8, 32))
            )
        )
    )
    assert kept['params'] == remat['params'] == count and kept['devices'] == 8
    assert kept['argument_bytes'] < 0.5 * 4 * 4 * count
    assert remat['temp_bytes'] < kept['temp_bytes']
    assert kept['flops'] == remat['flops'] > 0  # model FLOPs: remat's recomputation is not counted
    assert kept['peak_bytes'] >= kept['argument_bytes']


def test_flops_count_every_scanned_block_and_micro_batch(stage_c_arg):
    """XLA counts a loop body once; step_flops counts a scanned prior, or a batch accumulated over
    micro-batches, as the plain step."""
    mesh = sharding.create_mesh(ml_collections.ConfigDict(dict(data=8, fsdp=1, tensor=1)))
    counts = {}
    for name, scan, accum in (('plain', False, 1), ('scanned', True, 1), ('accumulated', False, 2)):
        config = _tiny_stage_c(stage_c_arg, depth=4, scan_blocks=scan)
        config.grad_accum_steps = accum
        lowered, _ = lowering.lower_from_shapes(config, mesh)
        counts[name] = (lowered.cost_analysis()['flops'], lowering.step_flops(config, lowered))
    assert counts['scanned'][0] < 0.8 * counts['plain'][0]  # the raw count misses three of the four blocks
    assert counts['accumulated'][0] < 0.8 * counts['plain'][0]  # ... and one of the two micro-batches
    for name in ('scanned', 'accumulated'):
        assert counts[name][1] == pytest.approx(counts['plain'][1], rel=1e-6), name


def test_remat_keeps_params_and_gradients():
    """Remat per block changes memory only: same param names, same loss and gradients (Stage B and C)."""
    rng = np.random.default_rng(0)
    x, r = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32), jnp.asarray([0.3, 0.7])
    clip = jnp.asarray(rng.standard_normal((2, 5, 16)), jnp.float32)
    effnet = jnp.asarray(rng.standard_normal((2, 2, 2, 4)), jnp.float32)
    decoder = dict(
        c_in=4,
        c_out=4,
        c_r=8,
        patch_size=1,
        c_cond=16,
        c_hidden=(8, 16),
        nhead=(-1, 2),
        blocks=(1, 1),
        level_config=('CT', 'CTA'),
        inject_effnet=(True, True),
        effnet_embd=4,
        clip_embd=16,
        dropout=0.0,
    )
    cases = [
        (lambda p: WuerstchenDiffNeXt(**decoder, remat_policy=p), (x, r, effnet, clip)),
        (
            lambda p: WuerstchenPrior(
                c_in=4, c=16, c_cond=16, c_r=8, depth=2, num_heads=2, dropout=0.0, scan_blocks=True, remat_policy=p
            ),
            (x, r, clip),
        ),
    ]
    for make, inputs in cases:
        shapes = jax.eval_shape(make('none').init, jax.random.key(1), *inputs)['params']
        params = jax.tree.map(lambda s: 0.1 * jnp.asarray(rng.standard_normal(s.shape), jnp.float32), shapes)
        results = {}
        for policy in ('none', 'full'):
            model = make(policy)
            names = jax.eval_shape(model.init, jax.random.key(1), *inputs)['params']
            assert jax.tree.structure(names) == jax.tree.structure(shapes)
            loss = lambda p: jnp.mean(model.apply({'params': p}, *inputs) ** 2)
            results[policy] = jax.jit(jax.value_and_grad(loss))(params)
        np.testing.assert_allclose(results['full'][0], results['none'][0], rtol=1e-5)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), results['full'][1], results['none'][1]
        )


def test_cli_compiles_for_a_tpu_topology(stage_c_arg, tmp_path):
    """The CLI with --topology runs the real TPU compiler (libtpu) on this CPU host, without a TPU."""
    cmd = [
        sys.executable,
        '-m',
        'wurst_jax.plan',
        f'--config={REPO}/configs/stage_c.py:{stage_c_arg}',
        '--config.text.max_length=8',
        '--config.input.image_size=32',
        '--config.input.resize=32',
        '--config.effnet.image_size=32',
        '--config.model.c=32',
        '--config.model.depth=2',
        '--config.model.num_heads=2',
        '--config.model.c_r=8',
        '--mesh=data=2,fsdp=2,tensor=1',
        '--batch=8',
        '--topology=v5e:2x2',
        '--device_gib=16',
        f'--out={tmp_path / "plan.json"}',
    ]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert 'on TPU v5e:2x2 (4 devices)' in out.stdout, out.stdout
    figures = json.loads((tmp_path / 'plan.json').read_text())
    assert figures['devices'] == 4 and figures['mesh'] == dict(data=2, fsdp=2, tensor=1)
    # At least float32 params, EMA and two Adam moments, each split at most fsdp=2 ways.
    assert figures['argument_bytes'] >= 4 * 4 * figures['params'] / 2
    assert figures['peak_bytes'] >= figures['argument_bytes'] and figures['flops'] > 0
    assert 'fits in 16 GiB:   yes' in out.stdout


def test_cli_refuses_a_bad_mesh_and_an_unknown_topology(stage_c_arg):
    base = [sys.executable, '-m', 'wurst_jax.plan', f'--config={REPO}/configs/stage_c.py:{stage_c_arg}']
    bad_mesh = subprocess.run(base + ['--mesh=data=2,pipeline=4'], cwd=REPO, capture_output=True, text=True)
    assert bad_mesh.returncode != 0 and 'AXIS=SIZE' in bad_mesh.stderr
    unknown = subprocess.run(
        base + ['--mesh=data=1,fsdp=4,tensor=1', '--batch=8', '--topology=v99:1x1'],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert unknown.returncode != 0 and "--topology='v99:1x1' could not be built" in unknown.stderr


def test_pixart_plan_with_t5_in_the_step_and_on_precomputed_states(tmp_path):
    """configs/pixart_alpha.py planned twice: with the frozen T5 encoding captions in the step, and on
    precomputed latents and T5 states (what `wurst_jax.precompute` writes). The trained state is the
    same; only the first holds T5's weights and runs it."""
    t5 = T5Encoder(vocab_size=64, d_model=64, d_kv=16, d_ff=1024, num_layers=2, num_heads=4)
    core.write_config(t5, str(tmp_path / 't5'), 't5_encoder')
    vqgan = VQGAN(levels=2, embed_dim=8, bottleneck_blocks=1, latent_channels=4, num_codes=16)
    core.write_config(vqgan, str(tmp_path / 'vqgan'), 'vqgan')
    arg = f'stage=2,runlocal,t5={tmp_path / "t5"},stage_a={tmp_path / "vqgan"}'

    def planned(precomputed: bool):
        config = plan.plan_config(load_config('pixart_alpha', arg), {}, 0)
        tasks.validate(config)
        if precomputed:
            plan.on_precomputed_records(config)
        return plan.plan(config, jax.devices()[:1])

    with_t5, precomputed = planned(False), planned(True)
    t5_params = sum(
        x.size for x in jax.tree.leaves(jax.eval_shape(t5.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    )
    assert with_t5['params'] == precomputed['params']
    # The batch of 8 x 120 float32 states on records is smaller than T5's weights in float32.
    states_bytes = 8 * 120 * 64 * 4
    assert with_t5['argument_bytes'] - precomputed['argument_bytes'] >= 4 * t5_params - states_bytes
    assert with_t5['flops'] > precomputed['flops']
    config = plan.plan_config(load_config('pixart_alpha', arg.replace('stage=2', 'stage=3')), {}, 0)
    with pytest.raises(app.UsageError, match='without aspect buckets'):
        plan.on_precomputed_records(config)
