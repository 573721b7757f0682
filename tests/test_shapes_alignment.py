"""The shapes alignment detector: right on the dataset's own images, wrong on wrong captions."""

import numpy as np
import pytest

from wurst_jax.data.shapes import (
    BACKGROUND,
    COLOURS,
    POSITIONS,
    SHAPES,
    TEST_INDEX_OFFSET,
    caption_for,
    make_example,
    parse_caption,
)
from wurst_jax.evaluate import shapes_alignment
from wurst_jax.evaluate.shapes_alignment import evaluate, score

NUM_PER_SIZE = 300
SIZES = (32, 64)


@pytest.fixture(scope='module')
def examples():
    """600 (image, caption) pairs from the generator the TFDS builder uses, train and test."""
    pairs = []
    for size in SIZES:
        pairs += [make_example(0, i, size) for i in range(NUM_PER_SIZE // 2)]
        pairs += [make_example(1, TEST_INDEX_OFFSET + i, size) for i in range(NUM_PER_SIZE // 2)]
    images, captions = zip(*pairs)
    return list(images), list(captions)


def _box_blur(image: np.ndarray) -> np.ndarray:
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode='edge')
    h, w = image.shape[:2]
    return sum(padded[i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9


def _degrade(image: np.ndarray, rng: np.random.Generator, noise_first: bool) -> np.ndarray:
    """Gaussian noise sigma=20 and a 3x3 box blur, in either order."""
    x = image.astype(np.float64)
    if noise_first:
        x = _box_blur(x + rng.normal(0, 20, x.shape))
    else:
        x = _box_blur(x) + rng.normal(0, 20, x.shape)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def test_clean_images_score_perfectly(examples):
    images, captions = examples
    result = evaluate(images, captions)
    assert result['num_images'] == len(images) >= 500
    assert result['num_objects'] > result['num_images']  # some captions have two objects
    assert result['num_objects'] == sum(len(parse_caption(c)) for c in captions)
    for key in ('colour_accuracy', 'position_accuracy', 'shape_accuracy', 'all_correct'):
        assert result[key] == 1.0, (key, result)


def test_score_reports_each_object(examples):
    images, captions = examples
    image, caption = next((im, c) for im, c in zip(images, captions) if ' and ' in c)
    result = score(image, caption)
    assert [(o['colour'], o['shape'], o['position']) for o in result['objects']] == [
        tuple(o) for o in parse_caption(caption)
    ]
    for obj in result['objects']:
        assert obj['colour_match'] and obj['position_match'] and obj['shape_match']
        assert obj['detected_shape'] == obj['shape']
    assert result['all_correct']
    # TFDS hands captions back as bytes.
    assert score(image, caption.encode())['all_correct']


def _corrupt(caption: str, field: str, rng: np.random.Generator) -> str:
    """Changes `field` of the first object to a value the image cannot show there."""
    objects = parse_caption(caption)
    first = objects[0]
    if field == 'colour':  # a colour no object in the image has
        options = [c for c in COLOURS if c not in {o.colour for o in objects}]
    elif field == 'position':  # a position no object in the image occupies
        options = [p for p in POSITIONS if p not in {o.position for o in objects}]
    else:
        options = [s for s in SHAPES if s != first.shape]
    objects[0] = first._replace(**{field: options[rng.integers(len(options))]})
    return caption_for(objects)


@pytest.mark.parametrize('field', ['colour', 'position', 'shape'])
def test_wrong_captions_fail(examples, field):
    images, captions = examples
    rng = np.random.default_rng(0)
    wrong = [_corrupt(c, field, rng) for c in captions]
    firsts = [score(im, c)['objects'][0] for im, c in zip(images, wrong)]
    accuracy = {k: np.mean([o[f'{k}_match'] for o in firsts]) for k in ('colour', 'position', 'shape')}
    assert accuracy[field] == 0, accuracy
    if field == 'shape':  # the object is still there, in its colour and place
        assert accuracy['colour'] == accuracy['position'] == 1, accuracy
    if field == 'position':  # the colour is still in the image
        assert accuracy['colour'] == 1, accuracy
    assert evaluate(images, wrong)['all_correct'] == 0


def test_mislabelled_captions_score_exactly_their_share(examples):
    """Captions 0, 2, 4 of every 6 name their first object's colour, position or shape wrongly.
    Detection is by the named colour, then judged at the named place, so that object fails colour,
    position and shape / position and shape / shape; every other object passes. Each accuracy is
    then the exact share of right objects (by the captions' own count), all_correct half the images."""
    images, captions = examples
    rng = np.random.default_rng(0)
    fields = {0: 'colour', 2: 'position', 4: 'shape'}
    wrong = [_corrupt(c, fields[i % 6], rng) if i % 6 in fields else c for i, c in enumerate(captions)]
    num_objects = sum(len(parse_caption(c)) for c in captions)
    mislabelled = {f: len(captions[k::6]) for k, f in fields.items()}
    result = evaluate(images, wrong)
    assert result['num_objects'] == num_objects
    failing = {
        'colour': mislabelled['colour'],
        'position': mislabelled['colour'] + mislabelled['position'],
        'shape': sum(mislabelled.values()),
    }
    for key, count in failing.items():
        assert result[f'{key}_accuracy'] == (num_objects - count) / num_objects, key
    assert result['all_correct'] == (len(captions) - sum(mislabelled.values())) / len(captions)


def test_blank_image_matches_nothing():
    for size in SIZES:
        blank = np.full((size, size, 3), BACKGROUND, np.uint8)
        result = score(blank, 'a white square in the center and a red circle on the left')
        assert not result['all_correct']
        for obj in result['objects']:
            assert not (obj['colour_match'] or obj['position_match'] or obj['shape_match'])


@pytest.mark.parametrize('noise_first', [True, False])
def test_degraded_images_still_score(examples, noise_first):
    images, captions = examples
    rng = np.random.default_rng(1)
    degraded = [_degrade(im, rng, noise_first) for im in images]
    result = evaluate(degraded, captions)
    # Measured (colour / position / shape): 1.0 / 1.0 / 1.0 noise first, 1.0 / 1.0 / 0.98
    # blur first (a few 8 px triangles read as circles when noise follows the blur).
    assert result['colour_accuracy'] >= 0.95, result
    assert result['position_accuracy'] >= 0.95, result
    assert result['shape_accuracy'] >= 0.95, result


def test_evaluate_accepts_a_stacked_batch(examples):
    images, captions = examples
    batch = np.stack(images[:NUM_PER_SIZE])  # all 32 px
    assert evaluate(batch, captions[:NUM_PER_SIZE]) == evaluate(images[:NUM_PER_SIZE], captions[:NUM_PER_SIZE])


def test_unparseable_caption_raises(examples):
    image = examples[0][0]
    with pytest.raises(ValueError, match='a purple blob somewhere'):
        score(image, 'a purple blob somewhere')
    with pytest.raises(ValueError, match='a red circle on the left and a blue square on the'):
        score(image, 'a red circle on the left and a blue square on the left')
    with pytest.raises(ValueError, match="item 1: caption 'a green thing'"):
        evaluate([image, image], ['a red circle on the left', 'a green thing'])


@pytest.mark.parametrize(
    'bad',
    [
        np.zeros((32, 32, 3), np.float32),
        np.zeros((32, 32), np.uint8),
        np.zeros((32, 32, 4), np.uint8),
        np.zeros((1, 32, 32, 3), np.uint8),
        np.zeros((0, 32, 3), np.uint8),
        [[[0, 0, 0]]],
    ],
    ids=['float', 'grey', 'rgba', 'batched', 'empty', 'list'],
)
def test_bad_images_raise(bad):
    with pytest.raises(ValueError, match=r'uint8 image of shape \[H, W, 3\]|empty image'):
        score(bad, 'a red circle on the left')


def test_bad_batches_raise(examples):
    images, captions = examples
    with pytest.raises(ValueError, match='2 images but 3 captions'):
        evaluate(images[:2], captions[:3])
    with pytest.raises(ValueError, match='single string'):
        evaluate(images[:1], captions[0])
    with pytest.raises(ValueError, match='batch of images'):
        evaluate(images[0], captions[:1])
    with pytest.raises(ValueError, match='at least one image'):
        evaluate([], [])


def test_thresholds_are_documented():
    doc = shapes_alignment.__doc__
    for name in (
        'MIN_COVERAGE',
        'MIN_AREA_FRACTION',
        'CENTROID_TOLERANCE',
        'TRIANGLE_MAX_TOP_FRACTION',
        'SQUARE_MIN_FILL',
        'MIN_SMOOTHED_EXTENT',
    ):
        assert name in doc, name


def test_random_pixels_do_not_align():
    """Noise holds every colour everywhere, but no object: it must fail colour and position."""
    rng = np.random.default_rng(0)
    captions = [make_example(0, i, 64)[1] for i in range(100)]
    palette = rng.integers(0, 8, (100, 64, 64))
    colours = np.array([BACKGROUND, *COLOURS.values()], np.uint8)
    for images in (colours[palette], rng.integers(0, 256, (100, 64, 64, 3)).astype(np.uint8)):
        result = evaluate(images, captions)
        assert result['colour_accuracy'] <= 0.05 and result['position_accuracy'] <= 0.05, result
