"""Tests of the grain input pipelines (digits, mocked TFDS, image folder)."""

import collections
import hashlib

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from tarflow_jax import input_pipeline as ip


def make_config(**dataset) -> ml_collections.ConfigDict:
    base = dict(name="digits", tfds_name=None, data_dir=None, train_split="train",
                eval_split="test", image_key="image", label_key="label", image_size=8,
                channels=1, num_levels=17, random_flip=False, resize=None)
    base.update(dataset)
    return ml_collections.ConfigDict(
        dict(batch_size=32, seed=0, data_workers=0, dataset=base))


def dataset_summary(config: ml_collections.ConfigDict) -> dict:
    """Sizes, image shape, levels and classes of a config's dataset (a test helper, moved out of the library)."""
    d = config.dataset
    train = ip.create_source(config, d.train_split)
    if d.name == "digits":
        classes = 10
    elif d.name == "folder":
        classes = len(train.classes)
    else:
        import tensorflow_datasets as tfds

        classes = tfds.builder(d.tfds_name, data_dir=d.data_dir).info.features[d.label_key].num_classes
    return {"name": d.tfds_name if d.name == "tfds" else d.name, "num_train": len(train),
            "num_eval": ip.num_eval_examples(config), "image_shape": (d.image_size, d.image_size, d.channels),
            "num_levels": d.num_levels, "num_classes": classes}


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def example_keys(images, labels):
    """Multiset of (image bytes, label) hashes: identifies examples up to exact duplicates."""
    return collections.Counter(
        hashlib.sha1(image.tobytes() + bytes([int(label)])).hexdigest()
        for image, label in zip(images, labels))


# ------------------------------------------------------------------------------ digits


def test_digits_split_sizes_and_batches():
    assert len(ip.DigitsSource("train")) == 1500
    assert len(ip.DigitsSource("test")) == 297
    config = make_config()
    assert ip.num_eval_examples(config) == 297
    batch = next(ip.create_train_iterator(config))
    assert batch["image"].shape == (32, 8, 8, 1) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
    assert batch["image"].max() <= 16 and batch["image"].max() > 0
    assert 0 <= batch["label"].min() and batch["label"].max() <= 9
    assert dataset_summary(config) == {
        "name": "digits", "num_train": 1500, "num_eval": 297, "image_shape": (8, 8, 1),
        "num_levels": 17, "num_classes": 10}


def test_digits_split_is_fixed_and_disjoint():
    train, test = ip.DigitsSource("train"), ip.DigitsSource("test")
    np.testing.assert_array_equal(train[0]["image"], ip.DigitsSource("train")[0]["image"])
    from sklearn.datasets import load_digits
    digits = load_digits()
    everything = example_keys(digits.images.astype(np.uint8)[..., None], digits.target)
    split = (example_keys([train[i]["image"] for i in range(1500)], [train[i]["label"] for i in range(1500)])
             + example_keys([test[i]["image"] for i in range(297)], [test[i]["label"] for i in range(297)]))
    assert split == everything


def test_same_seed_same_batches_other_seed_differs():
    config = make_config(random_flip=True)
    first = take(ip.create_train_iterator(config), 2)
    assert_batches_equal(first, take(ip.create_train_iterator(config), 2))
    config.seed = 1
    other = next(ip.create_train_iterator(config))
    assert not np.array_equal(first[0]["image"], other["image"])


def test_exact_resume_with_get_state_set_state():
    config = make_config(random_flip=True)
    iterator = ip.create_train_iterator(config)
    take(iterator, 3)
    state = iterator.get_state()
    expected = take(iterator, 2)
    resumed = ip.create_train_iterator(config)
    resumed.set_state(state)
    assert_batches_equal(expected, take(resumed, 2))


def test_exact_resume_through_orbax_checkpoint_manager(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    config = make_config(random_flip=True)
    iterator = ip.create_train_iterator(config)
    take(iterator, 3)
    params = {"w": np.arange(4.0)}
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(3, args=ocp.args.Composite(
            state=ocp.args.StandardSave(params), data=ip.save_args(iterator)))
        manager.wait_until_finished()
    expected = take(iterator, 2)

    resumed = ip.create_train_iterator(config)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        restored = manager.restore(3, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(params), data=ip.restore_args(resumed)))
    np.testing.assert_array_equal(restored.state["w"], params["w"])
    assert_batches_equal(expected, take(resumed, 2))


def test_process_shards_are_disjoint_and_cover_the_epoch():
    config = make_config()
    config.batch_size = 50  # 25 per process, 30 local batches = 750 = half an epoch
    per_process = []
    for index in range(2):
        batches = take(ip.create_train_iterator(config, process_index=index, process_count=2), 30)
        assert all(b["image"].shape == (25, 8, 8, 1) for b in batches)
        images = np.concatenate([b["image"] for b in batches])
        labels = np.concatenate([b["label"] for b in batches])
        per_process.append(example_keys(images, labels))
    train = ip.DigitsSource("train")
    everything = example_keys([train[i]["image"] for i in range(1500)], [train[i]["label"] for i in range(1500)])
    assert per_process[0] + per_process[1] == everything
    assert sum(per_process[0].values()) == sum(per_process[1].values()) == 750


def test_global_batch_does_not_depend_on_process_count():
    config = make_config()
    whole = next(ip.create_train_iterator(config, 0, 1))
    halves = [next(ip.create_train_iterator(config, i, 2)) for i in range(2)]
    for key in ("image", "label"):  # same rows, same order: runs reproduce across process counts
        np.testing.assert_array_equal(whole[key], np.concatenate([h[key] for h in halves]))


def test_batch_size_must_divide_by_process_count():
    config = make_config()
    config.batch_size = 33
    with pytest.raises(ValueError, match="divisible by process_count=2"):
        ip.create_train_iterator(config, 0, 2)


def test_eval_iterator_counts_every_example_once():
    config = make_config()
    batch_size = 64
    keys, num_batches = collections.Counter(), []
    for index in range(2):
        batches = list(ip.create_eval_iterator(config, batch_size, index, 2))
        num_batches.append(len(batches))
        for batch in batches:
            assert batch["image"].shape == (batch_size, 8, 8, 1)
            assert batch["mask"].dtype == np.bool_ and batch["mask"].shape == (batch_size,)
            mask = batch["mask"]
            keys += example_keys(batch["image"][mask], batch["label"][mask])
        # Padding only at the end of the last batch.
        mask = np.concatenate([b["mask"] for b in batches])
        assert not mask[-1] and mask.sum() in (148, 149)
        assert np.all(mask[: mask.sum()])
    assert num_batches == [3, 3]
    assert sum(keys.values()) == ip.num_eval_examples(config) == 297
    test = ip.DigitsSource("test")
    assert keys == example_keys([test[i]["image"] for i in range(297)], [test[i]["label"] for i in range(297)])


def test_eval_iterator_is_reiterable_and_unflipped():
    config = make_config(random_flip=True)
    dataset = ip.create_eval_iterator(config, 100, 0, 1)
    first, second = list(dataset), list(dataset)
    assert_batches_equal(first, second)
    test = ip.DigitsSource("test")
    np.testing.assert_array_equal(first[0]["image"][0], test[0]["image"])


def test_num_levels_requantizes_and_rejects_too_many():
    config = make_config(num_levels=4)
    batch = next(ip.create_train_iterator(config))
    assert batch["image"].max() == 3
    with pytest.raises(ValueError, match="num_levels=256 must be in 2..17"):
        ip.create_train_iterator(make_config(num_levels=256))


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="unknown config.dataset.name 'mnist'"):
        ip.create_train_iterator(make_config(name="mnist"))


def test_data_workers_give_the_same_batches():
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # grain's worker processes read its absl flags
    config = make_config(random_flip=True)
    expected = take(ip.create_train_iterator(config), 4)
    config.data_workers = 1
    iterator = ip.create_train_iterator(config)
    try:
        assert_batches_equal(expected[:2], take(iterator, 2))
        state = iterator.get_state()
    finally:
        iterator.close()
    resumed = ip.create_train_iterator(config)
    try:
        resumed.set_state(state)
        assert_batches_equal(expected[2:], take(resumed, 2))
    finally:
        resumed.close()


# -------------------------------------------------------------------------------- TFDS


def tfds_config(tmp_path, **dataset):
    base = dict(name="tfds", tfds_name="cifar10", data_dir=str(tmp_path), eval_split="test",
                image_size=32, channels=3, num_levels=256)
    return make_config(**{**base, **dataset})


def test_tfds_mock_data_source_batches(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    config = tfds_config(tmp_path)
    config.batch_size = 4
    with tfds.testing.mock_data(num_examples=10):
        batch = next(ip.create_train_iterator(config))
        assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.uint8
        assert batch["label"].dtype == np.int32 and batch["label"].max() < 10
        summary = dataset_summary(config)
        assert summary["name"] == "cifar10" and summary["num_classes"] == 10
        assert summary["num_train"] == summary["num_eval"] == 10

        config.dataset.update(image_size=16, channels=1, resize="center_crop", num_levels=32)
        batch = next(ip.create_train_iterator(config))
        assert batch["image"].shape == (4, 16, 16, 1) and batch["image"].max() < 32
        eval_batches = list(ip.create_eval_iterator(config, 8, 0, 1))
        assert [b["mask"].sum() for b in eval_batches] == [8, 2]


def test_tfds_unknown_feature_key(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=2):
        with pytest.raises(ValueError, match="no feature 'caption'.*label_key"):
            ip.create_train_iterator(tfds_config(tmp_path, label_key="caption"))


@pytest.mark.parametrize("name", ["downsampled_imagenet/64x64", "imagenet2012"])
def test_tfds_missing_dataset_explains_how_to_prepare(tmp_path, name):
    pytest.importorskip("tensorflow_datasets")
    config = tfds_config(tmp_path, tfds_name=name)
    with pytest.raises(FileNotFoundError) as error:
        ip.create_train_iterator(config)
    message = str(error.value)
    assert repr(name) in message and str(tmp_path) in message
    assert f"tfds build {name} --data_dir={tmp_path} --file_format=array_record" in message
    assert ("downloads/manual" in message) == (name == "imagenet2012")
    assert not (tmp_path / "downloads").exists()  # nothing was downloaded


# ------------------------------------------------------------------------------ folder


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.RandomState(0)
    sizes = {"cat": [(20, 30), (40, 17), (16, 16)], "dog": [(33, 21), (18, 50), (24, 24)]}
    for name, shapes in sizes.items():
        (tmp_path / "train" / name).mkdir(parents=True)
        for i, (height, width) in enumerate(shapes):
            pixels = rng.randint(0, 256, (height, width, 3), dtype=np.uint8)
            suffix = "jpg" if i == 2 else "png"
            Image.fromarray(pixels).save(tmp_path / "train" / name / f"{i}.{suffix}")
    (tmp_path / "train" / "notes.txt").write_text("not a class")
    return tmp_path


def folder_config(root, **dataset):
    base = dict(name="folder", data_dir=str(root), eval_split="train", image_size=16,
                channels=3, num_levels=256, resize="center_crop")
    config = make_config(**{**base, **dataset})
    config.batch_size = 4
    return config


def test_folder_center_crop_and_labels(image_folder):
    config = folder_config(image_folder)
    batches = list(ip.create_eval_iterator(config, 4, 0, 1))
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    assert images.shape == (8, 16, 16, 3) and images.dtype == np.uint8
    assert labels[mask].tolist() == [0, 0, 0, 1, 1, 1] and mask.sum() == 6
    assert dataset_summary(config)["num_classes"] == 2
    # The 16x16 JPEG is left untouched.
    np.testing.assert_array_equal(
        images[2], np.asarray(Image.open(image_folder / "train" / "cat" / "2.jpg").convert("RGB")))

    config.dataset.channels = 1
    assert next(ip.create_train_iterator(config))["image"].shape == (4, 16, 16, 1)


def test_folder_random_flip_is_seeded(image_folder):
    flipped = folder_config(image_folder, random_flip=True)
    plain = take(ip.create_train_iterator(folder_config(image_folder)), 6)
    first = take(ip.create_train_iterator(flipped), 6)
    assert_batches_equal(first, take(ip.create_train_iterator(flipped), 6))
    num_flipped = 0
    for a, b in zip(plain, first):
        for x, y in zip(a["image"], b["image"]):
            same = np.array_equal(x, y)
            assert same or np.array_equal(x[:, ::-1], y)
            num_flipped += not same
    assert 0 < num_flipped < 24


def test_folder_missing_or_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/train does not exist.*<class_name>"):
        ip.create_train_iterator(folder_config(tmp_path))
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=f"no images found in {tmp_path}/train"):
        ip.create_train_iterator(folder_config(tmp_path))


def test_wrong_size_without_resize(image_folder):
    iterator = ip.create_train_iterator(folder_config(image_folder, resize=None))
    with pytest.raises(ValueError, match="resize = 'center_crop'"):
        next(iterator)


# -------------------------------------------------------------------------- global batch


def test_make_global_batch_on_a_one_device_mesh():
    batch = next(ip.create_train_iterator(make_config()))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    for target in (mesh, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))):
        global_batch = ip.make_global_batch(batch, target)
        assert isinstance(global_batch["image"], jax.Array)
        assert global_batch["image"].shape == (32, 8, 8, 1)
        assert global_batch["label"].shape == (32,) and global_batch["label"].dtype == np.int32
        np.testing.assert_array_equal(np.asarray(global_batch["image"]), batch["image"])
