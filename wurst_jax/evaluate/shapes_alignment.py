"""Deterministic text-image alignment for the `shapes` dataset: does an image show its caption?

For every object of a caption ('a red circle on the left and ...', parsed with
`wurst_jax.data.shapes.parse_caption`) `score` answers three questions from the pixels alone:

* colour match: the image holds at least `min_count` pixels of that colour anywhere, counted
  after the 3x3 majority filter below (for objects of 8 px or more), so that only solid blobs
  count: an image of random pixels, where every colour is everywhere but nowhere solid, fails;
* position match: inside the caption position's cell (the third of the image around
  `POSITION_CENTRES[position]`, one arm of the 3x3 plus that the five positions form) the
  colour holds at least `min_count` pixels, and their centroid lies within
  `CENTROID_TOLERANCE` of the position's centre;
* shape match: the blob of that colour inside that cell has the caption's shape, read from
  two ratios of its bounding box (below).
Colour is checked image-wide so that a right colour in the wrong place fails position only;
a caption naming a colour twice is satisfied, for colour, by one object of it.

Pixel classification (`classify_pixels`). Each pixel goes to the nearest palette entry (the
seven `COLOURS` plus `BACKGROUND`, Euclidean RGB distance), and counts for an object colour
only if it lies within `(1 - MIN_COVERAGE)` = 0.5 of the way from that colour to the
background: 114 for red / green / blue, 159 for yellow / cyan / magenta, 193 for white.
  * Why relative to the background, not one fixed radius: a blurred edge is a blend
    background -> colour, and its distance from the colour grows with the number of channels
    the colour lifts. A fixed radius of 100 kept the two-thirds-covered edge pixels of a
    red square (76 away) but dropped those of a white one (128 away), so blurred squares of
    some colours lost their rim, others did not, and the shape test became colour-dependent.
    With the relative radius a pixel counts iff it is at least half covered (for a blend on
    the background-colour line), the same for every colour; a blurred convex object keeps its
    outline and loses only its sharpest corners.
  * Why 0.5: the label is always the nearest entry, so no radius can make it ambiguous; a
    radius of half the way to the background puts the cut exactly at half coverage and
    leaves the background at least 114 outside every radius (blue, the entry nearest it, is
    228 away). Gaussian noise sigma=20 per channel moves a pixel by sigma * chi(3 dof), so a
    noisy background pixel practically never turns into a colour (> 5.7 sigma, ~1e-7 per
    pixel), while flat object interiors stay well inside their radius.
  * Muddy colours far from every palette entry count for nothing.

Minimum size. A colour counts as present only with at least `min_count` =
ceil(`MIN_AREA_FRACTION` * expected object area) pixels, the expected area being the
dataset's object box, round(side * OBJECT_EXTENT) per axis. `MIN_AREA_FRACTION` = 0.2: the
smallest drawn object (a triangle) covers ~0.53-0.63 of its box, and at least ~0.44 after a
3x3 blur with sigma=20 noise (32 px images and up), so degraded true objects pass while a
few stray pixels (noise, a speck of colour in a generation) never count as an object.

Centroid tolerance. `CENTROID_TOLERANCE` = 1/12 of the side on each axis: half the distance
from a cell's centre to its edge. A drawn object's centroid lies within 0.04 of its centre
(triangles lowest: their mass is in the bottom half), so every drawn object passes, and a blob
whose mass sits at the edge of the cell does not.

Shape. From the colour's pixels in the cell, first smoothed by a 3x3 majority filter (a pixel
stays iff at least 5 of its 3x3 neighbourhood are set) so that single noise flips do not
stretch the bounding box; the filter is skipped for objects under `MIN_SMOOTHED_EXTENT` = 8 px
(images under 32 px), which it would erase.
  * top fraction = pixels in the upper half of the box / pixels in both halves (the middle row
    of an odd-height box left out). A triangle (apex up, as drawn) holds a quarter of its area
    above mid-height: ~0.27-0.41 measured, clean or degraded (a few 8 px triangles reach
    0.48 when sigma=20 noise follows the blur); circles and squares are symmetric, 0.5 clean
    and >= 0.43 degraded. Below `TRIANGLE_MAX_TOP_FRACTION` = 0.42: a triangle. This ratio
    barely moves when blur erodes the rim, hence it, not the fill ratio, finds triangles.
  * fill ratio = pixels / box area. Square ~1 (>= 0.85 degraded), circle ~pi/4 (0.75-0.81
    rasterised, <= 0.84 degraded). At or above `SQUARE_MIN_FILL` = 0.88 a square, else a
    circle.
Shapes need objects of ~8 px or more to survive blur: at 16 px (4 px objects) they are exact
on clean images only.
"""

import math
from typing import Any, Sequence

import numpy as np

from wurst_jax.data.shapes import BACKGROUND, COLOURS, OBJECT_EXTENT, POSITION_CENTRES, SceneObject, parse_caption

MIN_COVERAGE = 0.5
MIN_AREA_FRACTION = 0.2
CENTROID_TOLERANCE = 1 / 12
TRIANGLE_MAX_TOP_FRACTION = 0.42
SQUARE_MIN_FILL = 0.88
MIN_SMOOTHED_EXTENT = 8

# Palette index 0 is the background; 1.. follow COLOURS' order.
_PALETTE_NAMES = ('background',) + tuple(COLOURS)
_PALETTE = np.array([BACKGROUND, *COLOURS.values()], dtype=np.float32)
# Squared acceptance radius per palette entry: (1 - MIN_COVERAGE) of the way to the background;
# the background itself accepts everything it is nearest to.
_MAX_DIST2 = np.concatenate(
    [[np.inf], ((1 - MIN_COVERAGE) * np.linalg.norm(_PALETTE[1:] - _PALETTE[0], axis=-1)) ** 2]
).astype(np.float32)
# Half a third of the side: a position's cell spans its centre +- this on each axis.
_CELL_HALF = 1 / 6


def _check_image(image: Any) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        desc = (
            f'array of shape {image.shape} and dtype {image.dtype}'
            if isinstance(image, np.ndarray)
            else type(image).__name__
        )
        raise ValueError(f'shapes alignment needs a uint8 image of shape [H, W, 3], got {desc}')
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f'shapes alignment got an empty image of shape {image.shape}')
    return image


def _check_caption(caption: Any) -> list[SceneObject]:
    if isinstance(caption, bytes):
        caption = caption.decode('utf-8')
    if not isinstance(caption, str):
        raise ValueError(f'shapes alignment needs a caption string, got {caption!r}')
    return parse_caption(caption)  # ValueError naming the caption when it does not parse.


def classify_pixels(image: np.ndarray) -> np.ndarray:
    """Palette label per pixel: int [H, W], 0 background, 1.. COLOURS' order, -1 for none."""
    pixels = _check_image(image).astype(np.float32)
    dist2 = ((pixels[:, :, None, :] - _PALETTE) ** 2).sum(-1)  # [H, W, palette]
    labels = dist2.argmin(-1)
    far = np.take_along_axis(dist2, labels[..., None], -1)[..., 0] > _MAX_DIST2[labels]
    return np.where(far, -1, labels)


def _majority_filter(mask: np.ndarray) -> np.ndarray:
    """Keeps the pixels whose 3x3 neighbourhood (themselves included) is mostly set."""
    padded = np.pad(mask, 1).astype(np.int32)
    h, w = mask.shape
    votes = sum(padded[i : i + h, j : j + w] for i in range(3) for j in range(3))
    return votes >= 5


def _classify_shape(mask: np.ndarray, smooth: bool) -> tuple[str, float, float]:
    """(shape, fill ratio, top fraction) of the True pixels of a non-empty mask."""
    if smooth:
        smoothed = _majority_filter(mask)
        if smoothed.any():
            mask = smoothed
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    fill = len(ys) / ((y1 - y0 + 1) * (x1 - x0 + 1))
    mid = (y0 + y1) / 2
    top, bottom = int((ys < mid).sum()), int((ys > mid).sum())
    top_fraction = top / (top + bottom) if top + bottom else 0.5
    if top_fraction < TRIANGLE_MAX_TOP_FRACTION:
        shape = 'triangle'
    elif fill >= SQUARE_MIN_FILL:
        shape = 'square'
    else:
        shape = 'circle'
    return shape, float(fill), float(top_fraction)


def score(image: np.ndarray, caption: str) -> dict:
    """Alignment of one image with its caption.

    Returns {'objects': [per object: colour, shape, position (from the caption), colour_match,
    position_match, shape_match (bools), pixel_count (of the colour in the position's cell),
    centroid ((x, y) side fractions, None if no pixels), detected_shape (None below min_count),
    fill_ratio, top_fraction], 'all_correct': every object matches colour, position and shape}.
    """
    objects = _check_caption(caption)
    labels = classify_pixels(image)
    height, width = labels.shape
    extent_y, extent_x = round(height * OBJECT_EXTENT), round(width * OBJECT_EXTENT)
    min_count = max(1, math.ceil(MIN_AREA_FRACTION * extent_y * extent_x))
    smooth = min(extent_y, extent_x) >= MIN_SMOOTHED_EXTENT
    # Pixel centres as fractions of the side.
    fy = (np.arange(height) + 0.5) / height
    fx = (np.arange(width) + 0.5) / width
    results = []
    for obj in objects:
        colour_mask = labels == _PALETTE_NAMES.index(obj.colour)
        if smooth:  # an object is a solid blob: scattered pixels (noise, a speckled sample) count for nothing
            colour_mask = _majority_filter(colour_mask)
        cx, cy = POSITION_CENTRES[obj.position]
        rows = np.abs(fy - cy) < _CELL_HALF
        cols = np.abs(fx - cx) < _CELL_HALF
        cell = colour_mask & rows[:, None] & cols[None, :]
        count = int(cell.sum())
        result = {
            'colour': obj.colour,
            'shape': obj.shape,
            'position': obj.position,
            'colour_match': bool(colour_mask.sum() >= min_count),
            'position_match': False,
            'shape_match': False,
            'pixel_count': count,
            'centroid': None,
            'detected_shape': None,
            'fill_ratio': None,
            'top_fraction': None,
        }
        if count:
            ys, xs = np.nonzero(cell)
            centroid = (float(fx[xs].mean()), float(fy[ys].mean()))
            result['centroid'] = centroid
            result['position_match'] = bool(
                count >= min_count
                and abs(centroid[0] - cx) <= CENTROID_TOLERANCE
                and abs(centroid[1] - cy) <= CENTROID_TOLERANCE
            )
        if count >= min_count:
            shape, fill, top_fraction = _classify_shape(cell, smooth=False)  # already smoothed
            result.update(
                detected_shape=shape, fill_ratio=fill, top_fraction=top_fraction, shape_match=shape == obj.shape
            )
        results.append(result)
    all_correct = all(r['colour_match'] and r['position_match'] and r['shape_match'] for r in results)
    return {'objects': results, 'all_correct': all_correct}


def evaluate(images: Sequence[np.ndarray] | np.ndarray, captions: Sequence[str]) -> dict:
    """Alignment over a batch: accuracies are fractions over all objects of all captions.

    Returns colour_accuracy, position_accuracy, shape_accuracy, all_correct (fraction of images
    whose every object matches colour, position and shape), num_images, num_objects.
    """
    if isinstance(captions, (str, bytes)):
        raise ValueError('shapes alignment needs a sequence of captions, got a single string')
    if isinstance(images, np.ndarray) and images.ndim == 3:
        raise ValueError(
            f'shapes alignment needs a batch of images [N, H, W, 3], got an array '
            f'of shape {images.shape}; wrap a single image in a list or use score'
        )
    if len(images) != len(captions):
        raise ValueError(f'shapes alignment got {len(images)} images but {len(captions)} captions')
    if not len(images):
        raise ValueError('shapes alignment needs at least one image')
    colour = position = shape = objects = images_correct = 0
    for index, (image, caption) in enumerate(zip(images, captions)):
        try:
            result = score(image, caption)
        except ValueError as error:
            raise ValueError(f'item {index}: {error}') from error
        for obj in result['objects']:
            colour += obj['colour_match']
            position += obj['position_match']
            shape += obj['shape_match']
        objects += len(result['objects'])
        images_correct += result['all_correct']
    return {
        'colour_accuracy': colour / objects,
        'position_accuracy': position / objects,
        'shape_accuracy': shape / objects,
        'all_correct': images_correct / len(images),
        'num_images': len(images),
        'num_objects': objects,
    }
