"""configs/lora_shapes.py: the held-out colour never reaches the base's data, the small set holds only
scenes naming it, bad colours are refused naming the field, and the LoRA arm trains on a tiny base."""

import jax
import numpy as np
import pytest
from flax import traverse_util

from conftest import load_config
from wurst_jax import checkpoint, tasks, train
from wurst_jax.config_lib import ConfigError
from wurst_jax.data import input_pipeline, shapes
from wurst_jax.tasks.lora_task import RECORD

COLOUR = 'magenta'


def arm_config(arm: str, root, vqgan=None):
    config = load_config('lora_shapes', f'arm={arm},root={root},runlocal')
    config.input.data_dir = str(root / 'data')
    if vqgan is not None:  # a run: sampled and saved at its end only, to keep the test short
        config.stage_a.source = str(vqgan)
        config.image_every_steps = config.checkpoint_every_steps = config.total_steps
    return config


def captions(config, split: str) -> list[str]:
    return [c.decode() for c in (e['caption'] for e in input_pipeline.get_source(config.input, split))]


def colours_of(caption: str) -> set[str]:
    return {o.colour for o in shapes.parse_caption(caption)}


def test_base_never_sees_the_colour_and_the_small_set_always_names_it(tmp_path):
    base, small = arm_config('base', tmp_path), arm_config('lora', tmp_path)
    for split in ('train', 'test'):
        assert not any(COLOUR in colours_of(c) for c in captions(base, split))
        assert all(COLOUR in colours_of(c) for c in captions(small, split))
    # The other colours still occur, beside the new one and without it.
    assert set().union(*map(colours_of, captions(base, 'train'))) == set(shapes.COLOURS) - {COLOUR}
    assert len(captions(small, 'train')) == small.input.shapes.num_train


def test_a_filter_is_its_own_dataset_and_the_unfiltered_one_is_unchanged(tmp_path):
    names = {
        input_pipeline.builtin_builder(load_config('shapes', f'stage=c,runlocal{arg}').input).builder_config.name
        for arg in ('', f',hold_out={COLOUR}', f',only={COLOUR}')
    }
    assert names == {'s32_n64_t16_seed0', f's32_n64_t16_seed0_without_{COLOUR}', f's32_n64_t16_seed0_only_{COLOUR}'}
    # Without a filter each scene is the stream's first draw, as before filters existed.
    first = [shapes.caption_for(shapes.sample_objects(np.random.default_rng([7, i]))) for i in range(20)]
    assert shapes.fresh_captions(20, seed=7) == first
    # With one, a scene is redrawn exactly when its first draw does not fit.
    kept = shapes.fresh_captions(20, seed=7, hold_out=COLOUR)
    assert [k == f for k, f in zip(kept, first)] == [COLOUR not in colours_of(f) for f in first]


VALID = r"\['red', 'green', 'blue', 'yellow', 'magenta', 'cyan', 'white'\]"


@pytest.mark.parametrize(
    'name, arg, field, match',
    [
        ('shapes', 'stage=c,hold_out=orange', '<arg>.hold_out', VALID),
        ('shapes', 'stage=c,only=Magenta', '<arg>.only', VALID),
        ('shapes', f'stage=c,hold_out={COLOUR},only={COLOUR}', '<arg>.only', 'other than hold_out'),
        ('lora_shapes', 'arm=lora,colour=orange', '<arg>.colour', VALID),
    ],
)
def test_bad_colours_name_the_field_and_the_colours(name, arg, field, match):
    with pytest.raises(ConfigError, match=match) as error:
        load_config(name, arg)
    assert error.value.field == field


def test_lora_arm_trains_adapters_on_a_tiny_base(tmp_path, tiny_stage_folders):
    vqgan = tiny_stage_folders['vqgan']
    base = arm_config('base', tmp_path, vqgan)
    tasks.validate(base)
    train.train_and_evaluate(base, str(tmp_path / 'base'))
    config = arm_config('lora', tmp_path, vqgan)
    tasks.validate(config)
    train.train_and_evaluate(config, str(tmp_path / 'lora'))
    params = checkpoint.load_params(str(tmp_path / 'lora'), ema=True)
    assert list(params) == ['lora'] and (tmp_path / 'lora' / RECORD).exists()
    assert checkpoint.all_steps(str(tmp_path / 'lora'))[-1] == config.total_steps
    lora_b = [v for k, v in traverse_util.flatten_dict(params).items() if k[-1] == 'lora_b']
    assert lora_b and any(np.abs(b).max() > 0 for b in lora_b)  # zero at init: the adapters trained
    count = sum(np.size(x) for x in jax.tree.leaves(params))
    assert 0 < count < sum(np.size(x) for x in jax.tree.leaves(checkpoint.load_params(str(tmp_path / 'base'))))
    full = arm_config('full', tmp_path, vqgan)
    assert full.init.prior == f'{tmp_path}/base' and not full.lora.rank
    tasks.validate(full)
