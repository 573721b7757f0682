"""Never lose work: kill -9 and SIGTERM mid-run, a truncated latest checkpoint, non-finite steps.

Each run is a fresh `python -m wurst_jax.main` process on 8 fake CPU devices, as a user relaunching
the same command; the reference is one uninterrupted run with the same seed.
"""
import os
import random
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from wurst_jax import checkpoint, tasks, train

TOTAL = 24
EVERY = 3


def main_args(workdir, data_dir, total=TOTAL):
    return [sys.executable, '-m', 'wurst_jax.main', '--config=configs/shapes.py:runlocal', f'--workdir={workdir}',
            f'--config.total_steps={total}', f'--config.input.data_dir={data_dir}', '--config.mesh.data=4',
            '--config.mesh.fsdp=2', f'--config.checkpoint_every_steps={EVERY}', '--config.log_every_steps=5',
            f'--config.image_every_steps={total}', '--config.keep_checkpoints=20']


def env():
    return dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')


def run(workdir, data_dir, total=TOTAL):
    result = subprocess.run(main_args(workdir, data_dir, total), cwd=REPO, env=env(), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def committed_steps(workdir):
    """Steps whose checkpoint has been committed (orbax renames a finished save to its step number)."""
    directory = workdir / 'checkpoints'
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []


def start_and_signal(workdir, data_dir, sig, after_step):
    """Starts a run and sends `sig` as soon as a checkpoint at or beyond `after_step` is committed."""
    proc = subprocess.Popen(main_args(workdir, data_dir), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not any(s >= after_step for s in committed_steps(workdir)):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=600)
    return proc.returncode, stderr


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
    """(workdir, data_dir) of one uninterrupted run of TOTAL steps."""
    root = tmp_path_factory.mktemp('straight')
    run(root / 'run', root / 'data')
    return root / 'run', root / 'data'


def assert_same_final_state(a, b):
    for ema in (False, True):
        jax.tree.map(np.testing.assert_array_equal, checkpoint.load_params(str(a), ema=ema),
                     checkpoint.load_params(str(b), ema=ema))


def kill_preempt_corrupt_then_finish(straight, workdir, kill_after):
    """kill -9 after the checkpoint of `kill_after`; rerun and SIGTERM it; truncate the checkpoint that
    SIGTERM saved; rerun to the end. The final state must equal the straight run's bit for bit."""
    _, data_dir = straight
    rc, _ = start_and_signal(workdir, data_dir, signal.SIGKILL, kill_after)
    assert rc == -signal.SIGKILL
    rc, stderr = start_and_signal(workdir, data_dir, signal.SIGTERM, max(committed_steps(workdir)) + 1)
    assert rc == 0 and 'preempted (SIGTERM) at step' in stderr, stderr[-3000:]
    *_, previous, latest = committed_steps(workdir)
    for path in (workdir / 'checkpoints' / str(latest) / 'state').rglob('*'):
        if path.is_file():  # truncate every file of the newest state to half its size
            path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    resumed = run(workdir, data_dir)
    assert f'checkpoints/{latest} cannot be restored' in resumed.stderr, resumed.stderr[-3000:]
    assert f'checkpoints/{latest} that cannot be restored to' in resumed.stderr
    assert f'Restored checkpoint at step {previous}' in resumed.stderr
    assert (workdir / 'corrupt_checkpoints' / str(latest)).is_dir()
    assert max(committed_steps(workdir)) == TOTAL
    assert_same_final_state(straight[0], workdir)


def test_kill9_sigterm_and_truncated_checkpoint_then_resume_equals_straight_run(straight, tmp_path):
    seed = random.randrange(1000)
    kill_after = random.Random(seed).randrange(EVERY, TOTAL - 3 * EVERY)
    print(f'kill -9 after the checkpoint of step {kill_after} (seed {seed})')
    kill_preempt_corrupt_then_finish(straight, tmp_path / 'run', kill_after)


@pytest.mark.slow
@pytest.mark.parametrize('kill_after', [EVERY, 9, TOTAL - 3 * EVERY])
def test_kill9_at_three_points(straight, tmp_path, kill_after):
    kill_preempt_corrupt_then_finish(straight, tmp_path / 'run', kill_after)


def test_straight_run_leaves_events_images_and_eval(straight):
    workdir, _ = straight
    assert list(workdir.glob('events.out.tfevents.*'))
    assert (workdir / f'samples_{TOTAL:07d}.png').exists()
    assert (workdir / 'eval.jsonl').read_text().count('"psnr"') == 1


def test_load_params(straight):
    workdir, _ = straight
    _, state = checkpoint.load_trained(str(workdir), step=EVERY)
    params = checkpoint.load_params(str(workdir), step=EVERY)
    jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(state['params']))
    assert all(isinstance(a, np.ndarray) for a in jax.tree.leaves(params))
    latest = checkpoint.load_params(str(workdir), ema=True)
    assert jax.tree.structure(latest) == jax.tree.structure(params)
    with pytest.raises(FileNotFoundError, match='no checkpoint of step 7'):
        checkpoint.load_params(str(workdir), step=7)


def test_nonfinite_step_is_skipped_and_counted(tiny_shapes_config):
    config = tiny_shapes_config
    config.optimizer.warmup_steps, config.optimizer.schedule = 0, 'constant'
    task = tasks.create(config)
    tx = task.optimizer()
    batch = train.example_batch(task, 2)
    state = nn.meta.unbox(train.create_train_state(task, tx, jax.random.key(0), batch))
    step = jax.jit(lambda s, b: train.train_step(task, tx, config, s, b, {}))
    good = {'image': jax.random.uniform(jax.random.key(1), batch['image'].shape, minval=-1, maxval=1)}
    bad = {'image': good['image'].at[0, 0, 0, 0].set(jnp.nan)}

    skipped, metrics = step(state, bad)
    assert int(metrics['skipped']) == 1 and int(skipped.step) == 1
    for name in ('params', 'opt_state', 'ema_params'):
        jax.tree.map(np.testing.assert_array_equal, getattr(skipped, name), getattr(state, name))
    updated, metrics = step(skipped, good)
    assert int(metrics['skipped']) == 0 and int(updated.step) == 2
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(updated.params),
                                                          jax.tree.leaves(state.params)))


def test_summarize_counts_skipped_steps_and_stops_after_a_streak():
    step = lambda loss, skipped: {'loss': np.float32(loss), 'skipped': np.int32(skipped)}
    summary, streak = train.summarize([step(1.0, 0), step(np.nan, 1), step(3.0, 0)], 0, limit=3)
    assert summary == {'loss': 2.0, 'skipped_steps': 1.0} and streak == 0
    summary, streak = train.summarize([step(1.0, 0), step(np.nan, 1), step(np.nan, 1)], 0, limit=3)
    assert streak == 2 and summary['skipped_steps'] == 2.0
    with pytest.raises(FloatingPointError, match='3 steps in a row.*max_nonfinite_steps=3'):
        train.summarize([step(np.inf, 1)], streak, limit=3)
