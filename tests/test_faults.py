"""Never lose work: SIGKILL at random moments (mid-step, during an async checkpoint save), SIGTERM,
a torn checkpoint (its array data files cut short under whole metadata), Stage C with input worker
processes, non-finite steps.

Each launch is a fresh `python -m wurst_jax.main` process on 8 fake CPU devices, as a user rerunning
the same command. Every relaunch must resume from the newest checkpoint committed on disk, and the
run's end must equal one uninterrupted run with the same seed bit for bit: the whole train state
(params, EMA, optimizer state, model state, step, rng) and the batch each step read. The moments
come from a seeded random source: FAULT_SEED=<the seed a test printed> replays them.
"""

import os
import random
import re
import signal
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import Children, main_args
from wurst_jax import checkpoint, tasks, train, train_state

TOTAL = 12
EVERY = 2
STAGE_A = 'configs/shapes.py:runlocal'
STAGE_C = 'configs/shapes.py:stage=c,runlocal'
TOTAL_C = 6
STATE = {'step', 'params', 'ema_params', 'opt_state', 'model_state', 'rng'}


def run_args(config, workdir, data_dir, total, *extra):
    """The command of every launch of a run: a log line and a line of batch ids per step, a checkpoint
    every EVERY steps (all kept), images at the end."""
    return main_args(
        config,
        workdir,
        data_dir,
        total,
        f'--config.checkpoint_every_steps={EVERY}',
        '--config.log_every_steps=1',
        f'--config.image_every_steps={total}',
        '--config.keep_checkpoints=100',
        '--config.record_batch_ids=True',
        *extra,
    )


def stage_c_args(workdir, data_dir, folders):
    return run_args(
        STAGE_C,
        workdir,
        data_dir,
        TOTAL_C,
        f'--config.effnet.source={folders["effnet"]}',
        '--config.input.num_workers=1',
    )


def fault_rng(test: str) -> random.Random:
    seed = int(os.environ.get('FAULT_SEED', random.randrange(2**32)))
    print(f'{test}: FAULT_SEED={seed}')
    return random.Random(seed)


def committed_steps(workdir) -> list[int]:
    """Steps whose checkpoint has been committed (orbax renames a finished save to its step number)."""
    directory = workdir / 'checkpoints'
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []


def saves_in_progress(workdir) -> dict[str, int]:
    """{folder: step} of the saves begun and not committed: orbax writes into <step>.orbax-checkpoint-tmp-*."""
    directory = workdir / 'checkpoints'
    names = [p.name for p in directory.iterdir()] if directory.exists() else []
    return {name: int(m[1]) for name in names if (m := re.match(r'(\d+)\.orbax-checkpoint-tmp', name))}


def batch_ids(text: str) -> dict[int, str]:
    """{step: its line} of batch_ids.txt text; a last line that a kill cut short is left out."""
    return {int(line.split(' ', 1)[0]): line for line in text.split('\n')[:-1]}


def process_group(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group: fields 3 and 5 of /proc/PID/stat."""
    members = []
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            state, _, group = open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[:3]
        except OSError:  # it exited meanwhile
            continue
        if int(group) == pgid and state != 'Z':
            members.append(int(pid))
    return members


class Launch:
    """One launch of a run's command on its workdir; notes what was committed before it started."""

    def __init__(self, children: Children, args: list[str], workdir):
        self.children, self.workdir = children, workdir
        self.committed = committed_steps(workdir)
        self.stale_saves = set(saves_in_progress(workdir))
        ids = workdir / 'batch_ids.txt'
        self.ids_from = ids.stat().st_size if ids.exists() else 0
        self.proc = children.start(*args)

    def output(self) -> str:
        return Children.output(self.proc)

    def wait_for_step(self, step: int) -> None:
        """Until the metrics line of `step` is logged."""
        self.children.wait_until(lambda: f'] [{step}] ' in self.output(), [self.proc])

    def wait_for_save(self, step: int) -> None:
        """Until this launch has begun the async save of `step`."""
        began = lambda: (
            step in {s for name, s in saves_in_progress(self.workdir).items() if name not in self.stale_saves}
        )
        self.children.wait_until(began, [self.proc], poll=0.001)

    def kill(self, delay: float) -> None:
        time.sleep(delay)
        os.kill(self.proc.pid, signal.SIGKILL)
        self.children.wait(self.proc)  # and kills the rest of its process group
        assert self.proc.returncode == -signal.SIGKILL

    def check(self, reference, skip: int | None = None, finished: bool = False) -> None:
        """Asserts that it restored the newest checkpoint committed before it started, `skip` aside
        (started afresh without one), and that every batch it recorded is the reference run's for
        that step; `finished`: that it recorded every step from there to the end."""
        newest = max(set(self.committed) - {skip}, default=None)
        restored = [int(s) for s in re.findall(r'Restored checkpoint at step (\d+)', self.output())]
        assert restored == ([] if newest is None else [newest]), (restored, self.committed)
        ids = batch_ids((self.workdir / 'batch_ids.txt').read_bytes()[self.ids_from :].decode())
        reference_ids = batch_ids((reference / 'batch_ids.txt').read_text())
        first = (newest or 0) + 1
        assert sorted(ids) == list(range(first, first + len(ids)))
        assert ids == {step: reference_ids[step] for step in ids}
        if finished:
            assert first + len(ids) - 1 == max(reference_ids)


def assert_same_state(a, b) -> None:
    """The whole train state of both runs' newest checkpoints, bit for bit."""
    (_, state_a), (_, state_b) = checkpoint.load_trained(str(a)), checkpoint.load_trained(str(b))
    assert set(state_a) == STATE
    jax.tree.map(np.testing.assert_array_equal, state_a, state_b)


@pytest.fixture(scope='module')
def straight(module_children, tmp_path_factory):
    """(workdir, data_dir) of one uninterrupted Stage A run of TOTAL steps."""
    root = tmp_path_factory.mktemp('straight')
    module_children.run(*run_args(STAGE_A, root / 'run', root / 'data', TOTAL))
    return root / 'run', root / 'data'


@pytest.fixture(scope='module')
def stage_c_straight(module_children, tiny_stage_folders, tmp_path_factory):
    """(workdir, data_dir) of one uninterrupted Stage C run of TOTAL_C steps, one input worker process."""
    root = tmp_path_factory.mktemp('stage_c')
    module_children.run(*stage_c_args(root / 'run', root / 'data', tiny_stage_folders))
    return root / 'run', root / 'data'


def test_sigkill_mid_save_sigterm_and_a_torn_checkpoint_then_resume_equals_straight_run(straight, children, tmp_path):
    """SIGKILL during the async save of a random checkpoint; relaunch and SIGTERM it after a random
    step; tear the checkpoint SIGTERM saved; relaunch to the end. (A SIGKILL mid-step: Stage C below.)"""
    rng = fault_rng('stage A')
    reference, data_dir = straight
    workdir = tmp_path / 'run'
    args = run_args(STAGE_A, workdir, data_dir, TOTAL)

    run = Launch(children, args, workdir)
    save, delay = rng.randrange(2 * EVERY, TOTAL - EVERY + 1, EVERY), rng.uniform(0, 0.01)
    run.wait_for_save(save)
    run.kill(delay)
    print(f'SIGKILL {delay * 1e3:.0f} ms into the save of step {save}; committed: {committed_steps(workdir)}')
    assert save not in committed_steps(workdir) and save in saves_in_progress(workdir).values(), (
        'the save committed before the kill: the kill did not land mid-save'
    )
    run.check(reference)

    run = Launch(children, args, workdir)
    step = rng.randint(max(run.committed) + 1, TOTAL - 2)
    run.wait_for_step(step)
    run.proc.send_signal(signal.SIGTERM)
    preempted = int(re.search(r'preempted \(SIGTERM\) at step (\d+)', children.finish(run.proc))[1])
    print(f'SIGTERM after step {step} was logged: saved step {preempted}')
    assert max(committed_steps(workdir)) == preempted
    run.check(reference)

    state = workdir / 'checkpoints' / str(preempted) / 'state'
    # The arrays' bytes are in the OCDBT data files d/* (the merged root's and each process's).
    data_files = list(state.glob('**/d/*'))
    assert data_files and (state / '_METADATA').is_file() and (state / 'manifest.ocdbt').is_file()
    for path in data_files:  # torn writes: each array data file cut to half, orbax's metadata left whole
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    run = Launch(children, args, workdir)
    output = children.finish(run.proc)
    assert f'checkpoints/{preempted} cannot be restored' in output, output[-3000:]
    assert (workdir / 'corrupt_checkpoints' / str(preempted)).is_dir()
    run.check(reference, skip=preempted, finished=True)
    assert_same_state(reference, workdir)


def test_stage_c_with_an_input_worker_process_resumes_bit_for_bit(
    stage_c_straight, tiny_stage_folders, children, tmp_path
):
    """Stage C reading through a grain worker process: SIGKILL a random moment after a random step,
    relaunch to the end."""
    rng = fault_rng('stage C')
    reference, data_dir = stage_c_straight
    workdir = tmp_path / 'run'
    args = stage_c_args(workdir, data_dir, tiny_stage_folders)

    run = Launch(children, args, workdir)
    step, delay = rng.randint(1, TOTAL_C - 1), rng.uniform(0, 0.05)
    run.wait_for_step(step)
    assert len(process_group(run.proc.pid)) > 1, 'no input worker process runs'
    run.kill(delay)
    print(f'SIGKILL {delay * 1e3:.0f} ms after step {step} was logged; committed: {committed_steps(workdir)}')
    children.wait_until(lambda: not process_group(run.proc.pid), [], timeout=10)  # the worker went with it
    run.check(reference)

    run = Launch(children, args, workdir)
    children.finish(run.proc)
    run.check(reference, finished=True)
    assert_same_state(reference, workdir)


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
    config.loss.adv_weight = 0.0  # no discriminator: half the step to compile
    task = tasks.create(config)
    tx = task.optimizer()
    batch = train_state.example_batch(task, 2)
    state = nn.meta.unbox(train_state.create_train_state(task, tx, jax.random.key(0), batch))
    step = jax.jit(lambda s, b: train_state.train_step(task, tx, config, s, b, {}))
    good = {'image': jax.random.uniform(jax.random.key(1), batch['image'].shape, minval=-1, maxval=1)}
    bad = {'image': good['image'].at[0, 0, 0, 0].set(jnp.nan)}

    skipped, metrics = step(state, bad)
    assert int(metrics['skipped']) == 1 and int(skipped.step) == 1
    for name in ('params', 'opt_state', 'ema_params'):
        jax.tree.map(np.testing.assert_array_equal, getattr(skipped, name), getattr(state, name))
    updated, metrics = step(skipped, good)
    assert int(metrics['skipped']) == 0 and int(updated.step) == 2
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(updated.params), jax.tree.leaves(state.params)))


def test_summarize_counts_skipped_steps_and_stops_after_a_streak():
    step = lambda loss, skipped: {'loss': np.float32(loss), 'skipped': np.int32(skipped)}
    summary, streak = train.summarize([step(1.0, 0), step(np.nan, 1), step(3.0, 0)], 0, limit=3)
    assert summary == {'loss': 2.0, 'skipped_steps': 1.0} and streak == 0
    summary, streak = train.summarize([step(1.0, 0), step(np.nan, 1), step(np.nan, 1)], 0, limit=3)
    assert streak == 2 and summary['skipped_steps'] == 2.0
    with pytest.raises(FloatingPointError, match='3 steps in a row.*max_nonfinite_steps=3'):
        train.summarize([step(np.inf, 1)], streak, limit=3)
