"""The LoRA experiment of configs/lora_shapes.py: a base prior that never saw a colour word, then rank-4
adapters (Hu et al., arXiv:2106.09685) or a full fine-tune on a small set of scenes naming it.

  python bench/lora_shapes.py --root=workdirs/lora_shapes [--prompts=100] [--time_steps=10]

For the base and every checkpoint of ROOT/lora and ROOT/full it samples PROMPTS fresh captions that name
the colour and PROMPTS that do not (the old words: forgetting), and scores them with the shapes detector
(`wurst_jax.evaluate.shapes_alignment`): on the new-word prompts the objects of that colour alone, on the
old-word prompts every object. Then the adapters' size against the prior's, and the compiled LoRA and
full fine-tune steps timed alternately in this process. `steps needed` is the first checkpoint whose
new-word colour accuracy reaches NEEDED. Prints a Markdown table and one JSON line, also written to
ROOT/lora_shapes.json.
"""

import importlib.util
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from wurst_jax import checkpoint, lowering, sharding, tasks, train_state
from wurst_jax.data import shapes
from wurst_jax.evaluate import shapes_alignment
from wurst_jax.pipeline import Pipeline

_ROOT = flags.DEFINE_string('root', 'workdirs/lora_shapes', 'Where the runs are: ROOT/base, ROOT/lora, ROOT/full.')
_COLOUR = flags.DEFINE_string('colour', 'magenta', 'The held-out colour the runs were configured with.')
_PROMPTS = flags.DEFINE_integer('prompts', 100, 'Fresh captions sampled per prompt set.')
_TIME_STEPS = flags.DEFINE_integer('time_steps', 10, 'Compiled steps timed per arm; 0: none.')

NEEDED = 0.9  # new-word colour accuracy at which the word counts as learned
SEED = 1  # the sampling seed, as the demo's alignment uses


def lora_shapes_config(arg: str):
    spec = importlib.util.spec_from_file_location('lora_shapes_config', 'configs/lora_shapes.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def new_word_scores(images: np.ndarray, captions: list[str], colour: str) -> dict:
    """Accuracies over the objects of `colour` only, and all-correct over the images."""
    objects, correct = [], 0
    for image, caption in zip(images, captions):
        result = shapes_alignment.score(image, caption)
        objects += [o for o in result['objects'] if o['colour'] == colour]
        correct += result['all_correct']
    return {
        'colour_accuracy': float(np.mean([o['colour_match'] for o in objects])),
        'position_accuracy': float(np.mean([o['position_match'] for o in objects])),
        'shape_accuracy': float(np.mean([o['shape_match'] for o in objects])),
        'all_correct': correct / len(images),
    }


def alignment(workdir: str, step: int, new: list[str], old: list[str], colour: str) -> dict:
    """Both prompt sets' scores for the EMA params of `workdir` at `step` (a LoRA run's merged into its base)."""
    pipeline = Pipeline(workdir, None, prior_step=step)
    new_images = pipeline(new, seed=SEED, batch_size=32)
    old_images = pipeline(old, seed=SEED, batch_size=32)
    return {'new': new_word_scores(new_images, new, colour), 'old': shapes_alignment.evaluate(old_images, old)}


def param_count(tree) -> int:
    return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


def sizes(root: str) -> dict:
    """Trained parameter counts: the adapters, the prior (DiT) and the prior with its text encoder."""
    adapters, base = checkpoint.load_params(f'{root}/lora'), checkpoint.load_params(f'{root}/base')
    counts = {
        'adapters': param_count(adapters),
        'prior': param_count(base['prior']),
        'prior_and_text': param_count(base),
    }
    return {**counts, **{f'{k}_mb': v * 4 / 2**20 for k, v in counts.items()}}  # float32


def compiled_step(config, mesh):
    """(the compiled train step, a zero state, a zero batch, the frozen params) of `config`."""
    lowered, abstract_state = lowering.lower_from_shapes(config, mesh)
    task = tasks.create(config)
    state = jax.tree.map(lambda a: jax.device_put(jnp.zeros(a.shape, a.dtype), a.sharding), abstract_state)
    batch = train_state.example_batch(task, config.input.batch_size)
    return lowered.compile(), state, batch, nn.meta.unbox(task.frozen_params())


def seconds_per_step(root: str, steps: int) -> dict:
    """Median wall time of the LoRA and the full fine-tune steps, run alternately so both see the same load."""
    mesh, arms = None, {}
    for arm in ('lora', 'full'):
        config = lora_shapes_config(f'arm={arm},root={root},colour={_COLOUR.value}')
        config.mesh.update(data=1, fsdp=1, tensor=1)
        mesh = mesh or sharding.create_mesh(config.mesh, jax.devices('cpu')[:1])
        arms[arm] = list(compiled_step(config, mesh))
    times = {arm: [] for arm in arms}
    for i in range(steps + 1):
        for arm, (compiled, state, batch, frozen) in arms.items():
            start = time.perf_counter()
            state, metrics = compiled(state, batch, frozen)
            jax.block_until_ready(metrics)
            if i:  # the first run of each is a warm-up
                times[arm].append(time.perf_counter() - start)
            arms[arm][1] = state
    return {arm: sorted(t)[len(t) // 2] for arm, t in times.items()}


def table(rows: list[dict]) -> str:
    head = (
        '| run | steps | new: colour | new: position | new: shape | new: all correct '
        '| old: colour | old: position | old: shape | old: all correct |\n|' + '---|' * 10
    )
    lines = [head]
    for r in rows:
        n, o = r['new'], r['old']
        cells = [n['colour_accuracy'], n['position_accuracy'], n['shape_accuracy'], n['all_correct']]
        cells += [o['colour_accuracy'], o['position_accuracy'], o['shape_accuracy'], o['all_correct']]
        lines.append(f'| {r["run"]} | {r["step"]} | ' + ' | '.join(f'{c:.3f}' for c in cells) + ' |')
    return '\n'.join(lines)


def main(argv):
    del argv
    root, colour = _ROOT.value, _COLOUR.value
    new = shapes.fresh_captions(_PROMPTS.value, only=colour)
    old = shapes.fresh_captions(_PROMPTS.value, hold_out=colour)
    rows = [{'run': 'base', 'step': 0, **alignment(f'{root}/base', None, new, old, colour)}]
    for run in ('lora', 'full'):
        for step in checkpoint.all_steps(f'{root}/{run}'):
            rows.append({'run': run, 'step': step, **alignment(f'{root}/{run}', step, new, old, colour)})
    needed = {
        run: next((r['step'] for r in rows if r['run'] == run and r['new']['colour_accuracy'] >= NEEDED), None)
        for run in ('lora', 'full')
    }
    result = {'alignment': rows, 'steps_needed': needed, 'sizes': sizes(root)}
    if _TIME_STEPS.value:
        result['seconds_per_step'] = seconds_per_step(root, _TIME_STEPS.value)
    print(table(rows))
    print(f'steps needed (new-word colour accuracy >= {NEEDED}): {needed}')
    print(json.dumps(result))
    with open(os.path.join(root, 'lora_shapes.json'), 'w') as f:
        json.dump(result, f, indent=1)


if __name__ == '__main__':
    app.run(main)
