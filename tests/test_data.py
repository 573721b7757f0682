"""Data package: shapes generator, TFDS builders and the grain pipeline, on tiny sizes."""

import io
import json
import pathlib

import ml_collections
import numpy as np
import pytest
from PIL import Image

from wurst_jax.data import aspect_buckets, image_folder, input_pipeline, photos, shapes

SIZE = 32
NUM_TRAIN, NUM_TEST = 24, 8
# The spec, restated here so the tests check it rather than the implementation's own table.
SPEC_CENTRES = {
    'on the left': (1 / 6, 1 / 2),
    'on the right': (5 / 6, 1 / 2),
    'at the top': (1 / 2, 1 / 6),
    'at the bottom': (1 / 2, 5 / 6),
    'in the center': (1 / 2, 1 / 2),
}
SPEC_COLOURS = {
    'red': (255, 0, 0),
    'green': (0, 255, 0),
    'blue': (0, 0, 255),
    'yellow': (255, 255, 0),
    'magenta': (255, 0, 255),
    'cyan': (0, 255, 255),
    'white': (255, 255, 255),
}
BACKGROUND = (32, 32, 32)


def make_input_config(data_dir, **overrides) -> ml_collections.ConfigDict:
    """The input fields the pipeline reads, with tiny shapes settings."""
    fields = dict(
        dataset='shapes',
        data_dir=str(data_dir),
        folder='',
        train_split='train',
        eval_split='test',
        shapes=ml_collections.ConfigDict(dict(num_train=NUM_TRAIN, num_test=NUM_TEST, seed=0)),
        image_size=SIZE,
        resize=0,
        crop='center',
        flip=False,
        batch_size=8,
        num_workers=0,
    )
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)


@pytest.fixture(scope='module')
def shapes_dir(tmp_path_factory) -> pathlib.Path:
    """A data_dir holding the tiny shapes dataset, built once for the module."""
    data_dir = tmp_path_factory.mktemp('tfds')
    input_pipeline.prepare_builtin(make_input_config(data_dir))
    return data_dir


def take(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x['image'], y['image'])
        np.testing.assert_array_equal(x['id'], y['id'])
        np.testing.assert_array_equal(x['caption'], y['caption'])


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def raw_source(data_dir, split: str, **overrides):
    """The split's records with the image left as encoded bytes."""
    return input_pipeline.get_source(make_input_config(data_dir, **overrides), split)


# --- shapes generator --------------------------------------------------------------------------


def test_captions_follow_grammar_and_parse_round_trips():
    counts = set()
    for index in range(300):
        _, caption = shapes.make_example(0, index, SIZE)
        objects = shapes.parse_caption(caption)
        rebuilt = ' and '.join(f'a {c} {s} {p}' for c, s, p in objects)
        assert rebuilt == caption
        assert all(
            c in SPEC_COLOURS and s in ('circle', 'square', 'triangle') and p in SPEC_CENTRES for c, s, p in objects
        )
        assert len({p for _, _, p in objects}) == len(objects)
        counts.add(len(objects))
    assert counts == {1, 2}


@pytest.mark.parametrize(
    'caption',
    [
        'a red circle',
        'a purple circle on the left',
        'A red circle on the left',
        'a red circle on the left and',
        'a red circle on the left and a blue square on the left',
        'a red circle on the left and a blue square on the right and a red square at the top',
    ],
)
def test_parse_caption_rejects_off_grammar(caption):
    with pytest.raises(ValueError, match='caption'):
        shapes.parse_caption(caption)


def test_object_colour_at_position_centre_and_dark_grey_background():
    for index in range(100):
        image, caption = shapes.make_example(3, index, SIZE)
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
        objects = shapes.parse_caption(caption)
        for colour, _, position in objects:
            fx, fy = SPEC_CENTRES[position]
            assert tuple(image[int(fy * SIZE), int(fx * SIZE)]) == SPEC_COLOURS[colour], caption
        assert tuple(image[0, 0]) == BACKGROUND
        # No antialiasing: every pixel is the background or one of the caption's colours.
        allowed = {BACKGROUND} | {SPEC_COLOURS[c] for c, _, _ in objects}
        assert {tuple(p) for p in image.reshape(-1, 3)} <= allowed
        assert (image == BACKGROUND).all(-1).mean() > 0.5


@pytest.mark.parametrize('size', [16, 32, 64, 100])
def test_objects_at_different_positions_never_overlap(size):
    masks = {}
    for position in shapes.POSITIONS:
        image = shapes.render_scene([shapes.SceneObject('white', 'square', position)], size)
        masks[position] = (image != BACKGROUND).any(-1)
        fx, fy = SPEC_CENTRES[position]
        assert masks[position][int(fy * size), int(fx * size)]
    for a in shapes.POSITIONS:
        for b in shapes.POSITIONS:
            if a != b:
                assert not (masks[a] & masks[b]).any(), (a, b)


def test_make_example_is_deterministic_per_seed_and_index():
    for index in range(10):
        img_a, cap_a = shapes.make_example(7, index, SIZE)
        img_b, cap_b = shapes.make_example(7, index, SIZE)
        np.testing.assert_array_equal(img_a, img_b)
        assert cap_a == cap_b
    seed7 = [shapes.make_example(7, i, SIZE)[1] for i in range(20)]
    seed8 = [shapes.make_example(8, i, SIZE)[1] for i in range(20)]
    assert seed7 != seed8


# --- shapes builder ------------------------------------------------------------------------------


def test_shapes_builder_writes_array_record_and_is_not_rebuilt(shapes_dir, monkeypatch):
    version_dir = shapes_dir / 'shapes' / f's{SIZE}_n{NUM_TRAIN}_t{NUM_TEST}_seed0' / '1.0.0'
    files = sorted(version_dir.glob('shapes-*.array_record-*'))
    assert {f.name.split('.')[0] for f in files} == {'shapes-train', 'shapes-test'}
    mtimes = [f.stat().st_mtime_ns for f in files]

    def fail(*args, **kwargs):
        raise AssertionError('the prepared dataset was generated again')

    monkeypatch.setattr(shapes.Shapes, '_generate_examples', fail)
    source = raw_source(shapes_dir, 'train')
    assert len(source) == NUM_TRAIN
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    for record in (source[0], source[NUM_TRAIN - 1]):
        image, caption = shapes.make_example(0, int(record['id']), SIZE)
        np.testing.assert_array_equal(decode_png(record['image']), image)
        assert record['caption'].decode() == caption


def test_shapes_train_and_test_are_disjoint(shapes_dir):
    train = raw_source(shapes_dir, 'train')
    test = raw_source(shapes_dir, 'test')
    train_ids = {int(r['id']) for r in train}
    test_ids = {int(r['id']) for r in test}
    assert len(train_ids) == NUM_TRAIN and len(test_ids) == NUM_TEST
    assert not train_ids & test_ids
    # Each test record is the generator's output for its own id, from a stream train never uses.
    record = test[0]
    image, caption = shapes.make_example(0, int(record['id']), SIZE)
    np.testing.assert_array_equal(decode_png(record['image']), image)


def test_a_builder_made_while_another_process_prepares_the_dataset_is_not_used(tmp_path, monkeypatch):
    """Two processes on one data_dir: one's builder is made just before the other's final rename, and
    finds the dataset prepared. Read through that builder, the split would be taken for TFRecord."""
    config = make_input_config(tmp_path, shapes=ml_collections.ConfigDict(dict(num_train=4, num_test=2, seed=0)))
    made = iter([input_pipeline.builtin_builder(config)])  # made before the dataset exists
    input_pipeline.prepare_builtin(config)  # "the other process" finishes writing it
    real = input_pipeline.builtin_builder
    monkeypatch.setattr(input_pipeline, 'builtin_builder', lambda c: next(made, None) or real(c))
    assert len(input_pipeline.get_source(config, 'train')) == 4


def test_other_settings_get_their_own_directory(tmp_path):
    source = raw_source(tmp_path, 'train', shapes=ml_collections.ConfigDict(dict(num_train=5, num_test=2, seed=1)))
    assert len(source) == 5
    assert (tmp_path / 'shapes' / f's{SIZE}_n5_t2_seed1').is_dir()


def test_unknown_tfds_dataset_error_names_dataset_dir_and_fix(tmp_path):
    config = make_input_config(tmp_path, dataset='no_such_dataset_xyz')
    with pytest.raises(FileNotFoundError) as err:
        input_pipeline.get_source(config, 'train')
    message = str(err.value)
    assert 'no_such_dataset_xyz' in message and str(tmp_path) in message
    assert 'array_record' in message


# --- training iterator ---------------------------------------------------------------------------


def train_iterator(shapes_dir, *, seed=0, process_index=0, process_count=1, **overrides):
    config = make_input_config(shapes_dir, **overrides)
    return input_pipeline.create_train_iterator(
        config, seed=seed, process_index=process_index, process_count=process_count
    )


def test_train_batches_are_well_formed_and_deterministic(shapes_dir):
    batches = take(train_iterator(shapes_dir, seed=3), 6)
    first = batches[0]
    assert first['image'].shape == (8, SIZE, SIZE, 3) and first['image'].dtype == np.float32
    assert first['id'].dtype == np.int64 and first['caption'].shape == (8,)
    assert first['image'].min() == -1.0 and first['image'].max() == 1.0
    for caption in first['caption']:
        shapes.parse_caption(str(caption))
    assert_batches_equal(batches, take(train_iterator(shapes_dir, seed=3), 6))
    other = take(train_iterator(shapes_dir, seed=4), 3)
    assert [list(b['id']) for b in other] != [list(b['id']) for b in batches[:3]]
    # 24 examples, 8 per batch: each epoch is 3 batches holding every id once, in a new order.
    epochs = [np.concatenate([b['id'] for b in batches[i : i + 3]]) for i in (0, 3)]
    all_ids = {int(r['id']) for r in raw_source(shapes_dir, 'train')}
    assert set(epochs[0]) == set(epochs[1]) == all_ids and len(epochs[0]) == NUM_TRAIN
    assert list(epochs[0]) != list(epochs[1])


def test_process_shards_are_disjoint_and_cover_each_epoch(shapes_dir):
    all_ids = {int(r['id']) for r in raw_source(shapes_dir, 'train')}
    shards = [take(train_iterator(shapes_dir, process_index=p, process_count=2), 6) for p in (0, 1)]
    assert shards[0][0]['image'].shape[0] == 4
    for epoch in (0, 1):
        ids = [np.concatenate([b['id'] for b in shard[3 * epoch : 3 * epoch + 3]]) for shard in shards]
        assert not set(ids[0]) & set(ids[1])
        assert set(ids[0]) | set(ids[1]) == all_ids


def test_global_batch_rows_do_not_depend_on_the_process_count(shapes_dir):
    """Concatenating the processes' batches gives the one-process batch, row for row, pixel for pixel."""
    single = take(train_iterator(shapes_dir), 4)
    for count in (2, 4):
        shards = [take(train_iterator(shapes_dir, process_index=p, process_count=count), 4) for p in range(count)]
        for step in range(4):
            for key in ('id', 'image'):
                np.testing.assert_array_equal(np.concatenate([shard[step][key] for shard in shards]), single[step][key])


def test_global_batch_must_divide_among_processes(shapes_dir):
    with pytest.raises(ValueError, match='batch_size'):
        train_iterator(shapes_dir, batch_size=9, process_count=2)


def test_restored_iterator_reproduces_remaining_batches(shapes_dir):
    augment = dict(resize=40, crop='random', flip=True, seed=5)
    reference = take(train_iterator(shapes_dir, **augment), 8)
    partial = train_iterator(shapes_dir, **augment)
    take(partial, 3)
    restored = train_iterator(shapes_dir, **augment)
    restored.set_state(partial.get_state())
    assert_batches_equal(take(restored, 2), reference[3:5])
    # Resume a second time, from the resumed iterator's state.
    again = train_iterator(shapes_dir, **augment)
    again.set_state(restored.get_state())
    assert_batches_equal(take(again, 3), reference[5:8])
    # Augmentation is live: an example looks different in its two epochs.
    by_epoch = [{int(i): img for b in reference[e : e + 3] for i, img in zip(b['id'], b['image'])} for e in (0, 3)]
    assert any(not np.array_equal(by_epoch[0][i], by_epoch[1][i]) for i in by_epoch[0])


def test_iterator_state_round_trips_through_orbax(shapes_dir, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    reference = take(train_iterator(shapes_dir, seed=2), 5)
    iterator = train_iterator(shapes_dir, seed=2)
    take(iterator, 2)
    with ocp.CheckpointManager(tmp_path / 'ckpt', item_names=('data',)) as manager:
        manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
        restored = train_iterator(shapes_dir, seed=2)
        manager.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    assert_batches_equal(take(restored, 3), reference[2:5])


def test_worker_processes_give_the_same_batches(shapes_dir):
    augment = dict(resize=40, crop='random', flip=True)
    reference = take(train_iterator(shapes_dir, **augment), 4)
    with_workers = train_iterator(shapes_dir, num_workers=2, **augment)
    assert_batches_equal(take(with_workers, 4), reference)


# --- evaluation iterator -------------------------------------------------------------------------


def test_eval_iterator_keeps_last_partial_batch_and_is_unaugmented(shapes_dir):
    config = make_input_config(shapes_dir, crop='random', flip=True, resize=40)
    batches = list(input_pipeline.create_eval_iterator(config, split='test', batch_size=3, num_examples=7))
    assert [b['image'].shape[0] for b in batches] == [3, 3, 1]
    again = list(input_pipeline.create_eval_iterator(config, split='test', batch_size=3, num_examples=7))
    assert_batches_equal(batches, again)
    source = raw_source(shapes_dir, 'test')
    ids = np.concatenate([b['id'] for b in batches])
    assert list(ids) == [int(source[i]['id']) for i in range(7)]
    # Without resizing the centre crop is the whole image, so pixels map exactly to [-1, 1].
    plain = next(input_pipeline.create_eval_iterator(make_input_config(shapes_dir), split='test', batch_size=2))
    expected = decode_png(source[0]['image']).astype(np.float32) / 127.5 - 1
    np.testing.assert_allclose(plain['image'][0], expected, atol=1e-6)
    assert plain['caption'][0] == source[0]['caption'].decode()


# --- image_folder --------------------------------------------------------------------------------


def save(image: Image.Image, path: pathlib.Path, caption: str | None = None, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    if caption is not None:
        path.with_suffix('.txt').write_text(caption)


@pytest.fixture
def photo_folder(tmp_path) -> pathlib.Path:
    """A folder with good images of several modes, plus broken and uncaptioned ones."""
    folder = tmp_path / 'my photos'
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    save(rgb, folder / 'rgb.jpg', 'an rgb jpeg')
    save(Image.fromarray(np.full((8, 8), 77, np.uint8)), folder / 'gray.png', 'a grey square')
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:, :4] = (200, 10, 20, 255)  # Left half opaque, right half transparent.
    save(Image.fromarray(rgba), folder / 'rgba.png', 'half transparent')
    palette = Image.new('P', (2, 2))
    palette.putdata([0, 1, 1, 0])
    palette.putpalette([10, 20, 30, 250, 240, 230] + [0] * 762)
    save(palette, folder / 'palette.png', 'a palette checkerboard')
    deep = np.array([[0, 65535], [32768, 257]], np.uint16)
    save(Image.fromarray(deep), folder / 'deep.png', 'sixteen bits')
    save(rgb, folder / 'sub' / 'listed.png')
    (folder / 'captions.jsonl').write_text(
        json.dumps({'file': 'sub/listed.png', 'caption': 'from the jsonl'})
        + '\n'
        + json.dumps({'file': 'gone.png', 'caption': 'listed but absent'})
        + '\n'
    )
    save(rgb, folder / 'uncaptioned.png')
    (folder / 'corrupt.png').write_bytes(b'not an image at all' * 10)
    (folder / 'corrupt.txt').write_text('caption of a corrupt file')
    jpeg = io.BytesIO()
    rgb.save(jpeg, format='JPEG')
    (folder / 'truncated.jpg').write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (folder / 'truncated.txt').write_text('caption of a truncated file')
    (folder / 'empty.jpg').write_bytes(b'')
    (folder / 'empty.txt').write_text('caption of an empty file')
    return folder


def test_scan_counts_skipped_files_by_reason(photo_folder):
    scan = image_folder.scan_folder(photo_folder)
    kept = sorted(e.path.name for e in scan.entries)
    assert kept == ['deep.png', 'gray.png', 'listed.png', 'palette.png', 'rgb.jpg', 'rgba.png']
    reasons = {s.path.name: s.reason for s in scan.skipped}
    assert set(reasons) == {'uncaptioned.png', 'corrupt.png', 'truncated.jpg', 'empty.jpg', 'gone.png'}
    assert reasons['uncaptioned.png'] == 'missing caption'
    assert 'captions.jsonl' in reasons['gone.png']
    assert reasons['empty.jpg'] == 'empty file'
    assert reasons['truncated.jpg'].startswith('truncated image')
    assert reasons['corrupt.png'].startswith('unreadable image')
    report = scan.report()
    assert report['num_examples'] == 6 and report['num_skipped'] == 5
    assert sum(report['skipped_by_reason'].values()) == 5
    assert {e.path.name: e.caption for e in scan.entries}['listed.png'] == 'from the jsonl'


def test_image_folder_build_converts_to_rgb_and_writes_report(photo_folder, tmp_path):
    config = make_input_config(tmp_path / 'tfds', dataset='image_folder', folder=str(photo_folder))
    source = input_pipeline.get_source(config, 'train')
    records = {r['caption'].decode(): r for r in source}
    assert len(records) == 6
    images = {caption: decode_png(r['image']) for caption, r in records.items()}
    for image in images.values():
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
    np.testing.assert_array_equal(images['sixteen bits'][..., 0], [[0, 255], [128, 1]])
    np.testing.assert_array_equal(images['a grey square'], np.full((8, 8, 3), 77))
    assert (images['half transparent'][:, :4] == (200, 10, 20)).all()
    assert (images['half transparent'][:, 4:] == 255).all()  # Transparent onto white.
    np.testing.assert_array_equal(images['a palette checkerboard'][0], [[10, 20, 30], [250, 240, 230]])
    # An upright 8-bit RGB JPEG is stored as the original file bytes.
    assert records['an rgb jpeg']['image'] == (photo_folder / 'rgb.jpg').read_bytes()
    builder = input_pipeline.builtin_builder(config)
    report = json.loads((pathlib.Path(builder.data_dir) / image_folder.REPORT_NAME).read_text())
    assert {pathlib.Path(s['path']).name for s in report['skipped']} == {
        'uncaptioned.png',
        'corrupt.png',
        'truncated.jpg',
        'empty.jpg',
        'gone.png',
    }


def test_empty_image_folder_is_an_error_naming_it(tmp_path):
    folder = tmp_path / 'nothing here'
    folder.mkdir()
    config = make_input_config(tmp_path / 'tfds', dataset='image_folder', folder=str(folder))
    with pytest.raises(ValueError, match='nothing here'):
        input_pipeline.get_source(config, 'train')


# --- photos --------------------------------------------------------------------------------------


def test_photos_hold_out_astronaut_and_crops_tile_it(tmp_path):
    from skimage import data as skdata

    astronaut = skdata.astronaut()
    train = raw_source(tmp_path, 'train', dataset='photos')
    test = raw_source(tmp_path, 'test', dataset='photos')
    assert len(train) == len(photos.TRAIN_PHOTOS) and len(test) == 1
    np.testing.assert_array_equal(decode_png(test[0]['image']), astronaut)
    for record in train:
        image = decode_png(record['image'])
        assert image.ndim == 3 and image.shape[-1] == 3
        assert not (image.shape == astronaut.shape and np.array_equal(image, astronaut))
    assert not {int(r['id']) for r in train} & {int(test[0]['id'])}

    crops = photos.astronaut_crops(64)
    assert crops.shape == (64, 64, 64, 3) and crops.dtype == np.uint8
    np.testing.assert_array_equal(crops[9], astronaut[64:128, 64:128])  # Row 1, column 1.
    assert photos.astronaut_crops(128).shape == (16, 128, 128, 3)


# --- multi-aspect buckets -------------------------------------------------------------------------


def test_bucket_tables_are_pixarts():
    """Ours holds PixArt-α's 40 training ratios; diffusers ships the 33 it samples at, which must agree."""
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
        ASPECT_RATIO_256_BIN,
        ASPECT_RATIO_512_BIN,
        ASPECT_RATIO_1024_BIN,
    )

    for size, reference in ((256, ASPECT_RATIO_256_BIN), (512, ASPECT_RATIO_512_BIN), (1024, ASPECT_RATIO_1024_BIN)):
        ours = {str(ratio): [float(h), float(w)] for ratio, h, w in aspect_buckets.bucket_table(size)}
        assert len(ours) == 40 and {k: ours[k] for k in reference} == reference
    table = aspect_buckets.bucket_table(32, multiple=8)
    assert all(h % 8 == 0 and w % 8 == 0 for _, h, w in table)
    assert table[aspect_buckets.closest_bucket(30, 61, table)][1:] == (24, 48)


@pytest.fixture(scope='module')
def aspect_folder(tmp_path_factory) -> pathlib.Path:
    """12 landscape (h/w 0.5), 8 portrait (2.1) and 4 near-square (0.9) captioned images."""
    folder = tmp_path_factory.mktemp('aspect') / 'images'
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(20, 40)] * 12 + [(42, 20)] * 8 + [(27, 30)] * 4):
        save(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), folder / f'{i:02d}.png', f'image {i}')
    return folder


def bucket_iterator(folder, *, process_index=0, process_count=1, **overrides):
    fields = dict(
        dataset='image_folder',
        folder=str(folder),
        image_size=32,
        batch_size=4,
        aspect_buckets=True,
        bucket_multiple=8,
        crop='random',
    )
    config = make_input_config(folder.parent / 'tfds', **{**fields, **overrides})
    return input_pipeline.create_train_iterator(
        config, seed=1, process_index=process_index, process_count=process_count
    )


def test_bucketed_batches_share_one_bucket_and_shard_like_square_ones(aspect_folder):
    batches = take(bucket_iterator(aspect_folder), 10)
    sizes = {f'image {i}': s for i, s in enumerate([(20, 40)] * 12 + [(42, 20)] * 8 + [(27, 30)] * 4)}
    expected = {(20, 40): ((24, 48), 0.5), (42, 20): ((48, 24), 2.09), (27, 30): ((32, 32), 0.88)}
    shapes_seen = []
    for batch in batches:
        originals = {sizes[str(c)] for c in batch['caption']}
        assert len(originals) == 1  # one bucket per batch
        ((hw, ratio),) = [expected[o] for o in originals]
        assert batch['image'].shape == (4, *hw, 3)
        np.testing.assert_array_equal(batch['original_size'], np.tile(originals.pop(), (4, 1)))
        np.testing.assert_allclose(batch['aspect_ratio'], np.full((4, 1), ratio), rtol=1e-6)
        shapes_seen.append(hw)
    # An epoch is 3 + 2 + 1 batches: every image once, the buckets' batches interleaved.
    assert sorted(shapes_seen[:6]) == sorted([(24, 48)] * 3 + [(48, 24)] * 2 + [(32, 32)])
    assert shapes_seen[:6] != sorted(shapes_seen[:6]) and shapes_seen[:6] != shapes_seen[6:10] + shapes_seen[:2]
    assert len({str(c) for b in batches[:6] for c in b['caption']}) == 24
    # Two processes take the two halves of the same global batches; a restored iterator goes on alike.
    halves = [take(bucket_iterator(aspect_folder, process_index=p, process_count=2), 10) for p in (0, 1)]
    for step, batch in enumerate(batches):
        for key in ('id', 'image'):
            np.testing.assert_array_equal(np.concatenate([h[step][key] for h in halves]), batch[key])
    partial = bucket_iterator(aspect_folder)
    take(partial, 4)
    restored = bucket_iterator(aspect_folder)
    restored.set_state(partial.get_state())
    assert_batches_equal(take(restored, 6), batches[4:])


def test_buckets_too_small_for_a_batch_are_an_error(aspect_folder):
    with pytest.raises(ValueError, match='no aspect bucket holds a whole global batch of 16'):
        bucket_iterator(aspect_folder, batch_size=16)
