"""`shapes`: a synthetic captioned dataset of coloured shapes, generated from a seed.

Every image holds one or two objects on a #202020 background; the caption names each object's
colour, shape and position, so text-image alignment can be scored exactly with `parse_caption`.
A colour can be held out (no scene draws it: a word the model never sees) or required (every scene
names it: a small set teaching that word); both redraw a stream's scenes until they fit.
"""

import dataclasses
import re
from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

from wurst_jax.data.captioned import CaptionedImageBuilder, encode_png

BACKGROUND = (32, 32, 32)
COLOURS: dict[str, tuple[int, int, int]] = {
    'red': (255, 0, 0),
    'green': (0, 255, 0),
    'blue': (0, 0, 255),
    'yellow': (255, 255, 0),
    'magenta': (255, 0, 255),
    'cyan': (0, 255, 255),
    'white': (255, 255, 255),
}
SHAPES = ('circle', 'square', 'triangle')
POSITIONS = ('on the left', 'on the right', 'at the top', 'at the bottom', 'in the center')
# Object centre as (x, y) fractions of the image side: the middle of that third of the image.
POSITION_CENTRES: dict[str, tuple[float, float]] = {
    'on the left': (1 / 6, 1 / 2),
    'on the right': (5 / 6, 1 / 2),
    'at the top': (1 / 2, 1 / 6),
    'at the bottom': (1 / 2, 5 / 6),
    'in the center': (1 / 2, 1 / 2),
}
# Neighbouring centres are a third of the side apart on each axis, so any extent below 1/3
# keeps every pair of positions apart; a quarter leaves a visible gap.
OBJECT_EXTENT = 1 / 4
MIN_IMAGE_SIZE = 16
# The test split reads indices from this offset on, a range the train split never reaches.
TEST_INDEX_OFFSET = 2**40

_OBJECT = (
    rf'a ({"|".join(COLOURS)}) ({"|".join(SHAPES)}) '
    rf'({"|".join(re.escape(p) for p in POSITIONS)})'
)
_CAPTION_RE = re.compile(rf'{_OBJECT}(?: and {_OBJECT})?')


class SceneObject(NamedTuple):
    """One drawn object: colour name, shape name, position phrase."""

    colour: str
    shape: str
    position: str


def object_box(position: str, image_size: int) -> tuple[int, int, int, int]:
    """Inclusive pixel box (x0, y0, x1, y1) of an object at `position`."""
    extent = round(image_size * OBJECT_EXTENT)
    fx, fy = POSITION_CENTRES[position]
    x0 = round(fx * image_size - extent / 2)
    y0 = round(fy * image_size - extent / 2)
    return x0, y0, x0 + extent - 1, y0 + extent - 1


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, image_size: int) -> None:
    """Draws one object, unantialiased so its interior is the exact colour."""
    x0, y0, x1, y1 = object_box(obj.position, image_size)
    fill = COLOURS[obj.colour]
    if obj.shape == 'circle':
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif obj.shape == 'square':
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)


def render_scene(objects: list[SceneObject], image_size: int) -> np.ndarray:
    """Draws `objects` on the background: uint8 [S, S, 3]."""
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f'shapes image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}')
    image = Image.new('RGB', (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        _draw_object(draw, obj, image_size)
    return np.asarray(image)


def caption_vocabulary() -> list[str]:
    """Every word the grammar uses."""
    phrases = ['a', 'and', *COLOURS, *SHAPES, *POSITIONS]
    return sorted({word for phrase in phrases for word in phrase.split()})


def caption_for(objects: list[SceneObject]) -> str:
    """The grammar's caption for `objects`: 'a {colour} {shape} {position}[ and a ...]'."""
    return ' and '.join(f'a {o.colour} {o.shape} {o.position}' for o in objects)


def parse_caption(caption: str) -> list[SceneObject]:
    """Inverse of `caption_for`; ValueError if `caption` does not follow the grammar."""
    match = _CAPTION_RE.fullmatch(caption)
    if match is None:
        raise ValueError(
            f'caption {caption!r} does not follow the shapes grammar '
            "'a {colour} {shape} {position}[ and a {colour} {shape} {position}]'"
        )
    groups = [g for g in match.groups() if g is not None]
    objects = [SceneObject(*groups[i : i + 3]) for i in range(0, len(groups), 3)]
    if len({o.position for o in objects}) != len(objects):
        raise ValueError(f'caption {caption!r} puts two objects in the same position')
    return objects


def sample_objects(rng: np.random.Generator) -> list[SceneObject]:
    """One or two objects with random colours and shapes at distinct positions."""
    count = int(rng.integers(1, 3))
    positions = rng.choice(len(POSITIONS), size=count, replace=False)
    colours = rng.integers(len(COLOURS), size=count)
    shapes = rng.integers(len(SHAPES), size=count)
    names = list(COLOURS)
    return [SceneObject(names[c], SHAPES[s], POSITIONS[p]) for c, s, p in zip(colours, shapes, positions)]


def check_colour(colour: str) -> None:
    """ValueError unless `colour` is '' (no filter) or one of COLOURS."""
    if colour and colour not in COLOURS:
        raise ValueError(f'shapes colour {colour!r} is not one of {list(COLOURS)}')


def scene_objects(rng: np.random.Generator, hold_out: str = '', only: str = '') -> list[SceneObject]:
    """`sample_objects` redrawn until no object is `hold_out` and (unless `only` is '') one is `only`:
    rejection keeps the stream's distribution, conditioned on the filter; with neither, its first draw."""
    check_colour(hold_out)
    check_colour(only)
    if only and only == hold_out:
        raise ValueError(f'shapes only={only!r} is the held-out colour: no scene would fit')
    while True:
        objects = sample_objects(rng)
        colours = {o.colour for o in objects}
        if hold_out not in colours and (not only or only in colours):
            return objects


EVAL_CAPTION_SEED = 7919  # a caption stream the training split (seed 0) never draws from


def fresh_captions(count: int, seed: int = EVAL_CAPTION_SEED, hold_out: str = '', only: str = '') -> list[str]:
    """`count` captions of the stream `seed`, for scoring text alignment on prompts not trained on."""
    return [caption_for(scene_objects(np.random.default_rng([seed, i]), hold_out, only)) for i in range(count)]


def make_example(seed: int, index: int, image_size: int, hold_out: str = '', only: str = '') -> tuple[np.ndarray, str]:
    """Example `index` of the stream `seed`: (image uint8 [S, S, 3], caption)."""
    objects = scene_objects(np.random.default_rng([seed, index]), hold_out, only)
    return render_scene(objects, image_size), caption_for(objects)


@dataclasses.dataclass(eq=False, kw_only=True)
class ShapesConfig(tfds.core.BuilderConfig):
    """Generation settings; the config name encodes them so settings never share a directory."""

    image_size: int = 64
    num_train: int = 20000
    num_test: int = 256
    seed: int = 0
    hold_out: str = ''  # a colour no scene of either split draws
    only: str = ''  # a colour every scene of either split names


def shapes_config(
    *, image_size: int, num_train: int, num_test: int, seed: int, hold_out: str = '', only: str = ''
) -> ShapesConfig:
    """A ShapesConfig named after its settings, e.g. 's64_n20000_t256_seed0', or with a colour filter
    's64_n20000_t256_seed0_without_magenta' / '..._only_magenta' (the unfiltered names are unchanged,
    so datasets already prepared stay valid)."""
    check_colour(hold_out)
    check_colour(only)
    name = f's{image_size}_n{num_train}_t{num_test}_seed{seed}'
    name += f'_without_{hold_out}' if hold_out else ''
    name += f'_only_{only}' if only else ''
    return ShapesConfig(
        name=name,
        image_size=image_size,
        num_train=num_train,
        num_test=num_test,
        seed=seed,
        hold_out=hold_out,
        only=only,
    )


class Shapes(CaptionedImageBuilder):
    """Coloured shapes with grammar captions; train and test come from disjoint index ranges."""

    def image_shape(self) -> tuple[int, int, int]:
        size = self.builder_config.image_size
        return (size, size, 3)

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        return {
            'train': self._generate_examples(0, cfg.num_train),
            'test': self._generate_examples(TEST_INDEX_OFFSET, cfg.num_test),
        }

    def _generate_examples(self, start: int, count: int):
        cfg = self.builder_config
        for index in range(start, start + count):
            image, caption = make_example(cfg.seed, index, cfg.image_size, cfg.hold_out, cfg.only)
            yield index, {'image': encode_png(image), 'caption': caption, 'id': index}
