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


def global_batches(config, process_count, num, start=0):
    """``num`` global batches assembled from the ``process_count`` processes' shards."""
    shards = [take(ip.create_train_iterator(config, i, process_count, start=start), num)
              for i in range(process_count)]
    return [{key: np.concatenate([shards[i][k][key] for i in range(process_count)]) for key in ("image", "label")}
            for k in range(num)]


def test_resume_from_the_global_position_on_any_process_count():
    """A stream stopped after 3 batches continues exactly on 1, 2 or 4 processes (and another batch size)."""
    config = make_config(random_flip=True)
    whole = take(ip.create_train_iterator(config, 0, 1), 6)
    position = 3 * config.batch_size
    assert ip.data_state(config, position) == {"format": ip.DATA_STATE_FORMAT, "examples_seen": 96,
                                               "batch_size": 32, "seed": 0}
    assert ip.resume_position(ip.data_state(config, position), 3, config) == 96
    for count in (1, 2, 4):
        assert_batches_equal(whole[3:], global_batches(config, count, 3, start=position))
    config.batch_size = 16  # the position counts examples, so the batch size may change too
    halves = global_batches(config, 2, 2, start=position)
    assert_batches_equal([whole[3]], [{k: np.concatenate([h[k] for h in halves]) for k in ("image", "label")}])
    config.batch_size = 32
    past_epoch = 47 * 32  # 1,504 examples: the second epoch (another permutation) began 4 examples ago
    assert_batches_equal(take(ip.create_train_iterator(config, 0, 1), 48)[47:],
                         global_batches(config, 2, 1, start=past_epoch))


def test_old_per_process_grain_states_give_the_global_position():
    """Checkpoints written before the position became global held one grain state per process."""
    config = make_config(random_flip=True)
    old = ip.create_train_iterator(config, 1, 2)  # the old pipeline is the new one from position 0
    take(old, 3)
    stored = {"grain_states": [{"next_index": 3}, old.get_state()]}
    position = ip.resume_position(stored, 3, config)
    assert position == 3 * config.batch_size
    assert_batches_equal(take(old, 2), take(ip.create_train_iterator(config, 1, 2, start=position), 2))
    assert ip.resume_position(None, 5, config) == 5 * 32  # no data item (e.g. converted): the step
    with pytest.raises(ValueError, match="disagree"):
        ip.resume_position({"grain_states": [{"next_index": 3}, {"next_index": 4}]}, 3, config)


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
    finally:
        iterator.close()
    resumed = ip.create_train_iterator(config, start=2 * config.batch_size)  # resumed with workers
    try:
        assert_batches_equal(expected[2:], take(resumed, 2))
    finally:
        resumed.close()


# ------------------------------------------------------------------ model and data agree


@pytest.mark.parametrize("field,value,match", [
    ("model.num_classes", 5, r"config.model.num_classes=5 but the dataset 'digits' has 10 classes.*"
                             r"--config.model.num_classes=10"),
    ("model.num_classes", 12, "has 10 classes"),
    ("dataset.label_key", None, "config.dataset.label_key is None"),
    ("dataset.image_size", 16, r"train split 'train' of 'digits' does not fit.*\(8, 8, 1\) is not 16x16"),
    ("dataset.channels", 2, "config.dataset.channels must be 1 or 3"),
    ("dataset.num_levels", 256, r"num_levels=256 must be in 2..17"),
])
def test_model_and_data_must_agree(field, value, match):
    config = make_config()
    config.model = ml_collections.ConfigDict(dict(num_classes=10))
    ip.check_config_against_data(config)  # the digits defaults agree
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ValueError, match=match):
        ip.check_config_against_data(config)


def test_unconditional_model_or_resize_agree_with_any_labels_and_sizes():
    config = make_config(image_size=16, resize="center_crop", channels=3, num_levels=4)
    config.model = ml_collections.ConfigDict(dict(num_classes=0))
    ip.check_config_against_data(config)


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


def test_tfds_classes_checked_against_the_dataset_info(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    config = tfds_config(tmp_path)
    config.model = ml_collections.ConfigDict(dict(num_classes=10))
    with tfds.testing.mock_data(num_examples=4):
        ip.check_config_against_data(config)
        config.model.num_classes = 100
        with pytest.raises(ValueError, match="num_classes=100 but the dataset 'cifar10' has 10 classes"):
            ip.check_config_against_data(config)


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


def test_resize_center_crop_matches_torchvision():
    transforms = pytest.importorskip("torchvision.transforms", reason="needs torchvision (the test extra)")
    rng = np.random.RandomState(0)
    for height, width, size in ((20, 30, 16), (40, 17, 16), (33, 21, 16), (512, 512, 256), (375, 500, 64),
                                (500, 333, 128), (10, 13, 16)):  # down, down, odd offsets, AFHQ, ImageNet-like, up
        image = Image.fromarray(rng.randint(0, 256, (height, width, 3), dtype=np.uint8))
        want = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size)])(image)
        np.testing.assert_array_equal(np.asarray(ip.resize_center_crop(image, size)), np.asarray(want))


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


def test_folder_missing_split_names_the_splits_it_has(image_folder):
    (image_folder / "val" / "cat").mkdir(parents=True)  # AFHQ ships train/ and val/, no test/
    config = folder_config(image_folder, eval_split="test")
    with pytest.raises(FileNotFoundError, match=r"split 'test'\) does not exist: .* has the splits \['train', 'val'\]"):
        ip.num_eval_examples(config)


def test_folder_missing_or_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/train \\(split 'train'\\) does not exist.*"
                                                "no split folders.*<class_name>"):
        ip.create_train_iterator(folder_config(tmp_path))
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=f"no images found in {tmp_path}/train"):
        ip.create_train_iterator(folder_config(tmp_path))


def test_wrong_size_without_resize(image_folder):
    iterator = ip.create_train_iterator(folder_config(image_folder, resize=None))
    with pytest.raises(ValueError, match="resize = 'center_crop'"):
        next(iterator)
    with pytest.raises(ValueError, match="resize = 'center_crop'"):  # also when channels convert
        next(ip.create_train_iterator(folder_config(image_folder, resize=None, channels=1)))
    with pytest.raises(ValueError, match="does not fit the config.*resize"):  # at start-up
        ip.check_config_against_data(folder_config(image_folder, resize=None), splits=("train",))


def test_folder_classes_checked(image_folder):
    config = folder_config(image_folder)
    config.model = ml_collections.ConfigDict(dict(num_classes=2))
    ip.check_config_against_data(config, splits=("train",))
    config.model.num_classes = 3
    with pytest.raises(ValueError, match="num_classes=3 but the dataset 'folder' has 2 classes"):
        ip.check_config_against_data(config, splits=("train",))


# -------------------------------------------------------------- image-net.org Imagenet64x64


def write_official(root, split, size=8, per_file=5, seed=0, npz=False, subfolder=""):
    """Files in image-net.org's format: dict(data=uint8 rows R-plane|G-plane|B-plane, labels=1..1000)."""
    import pickle
    rng = np.random.default_rng(seed)
    folder = root / subfolder
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = [], []
    for name in ip.OFFICIAL_FILES[split]:
        image = rng.integers(0, 256, (per_file, size, size, 3), dtype=np.uint8)
        label = rng.integers(1, 1001, per_file)
        record = {"data": image.transpose(0, 3, 1, 2).reshape(per_file, -1), "labels": label.tolist()}
        if split == "train":
            record["mean"] = image.reshape(per_file, -1).mean(0)
        if npz:
            np.savez(folder / f"{name}.npz", **record)
        else:
            with open(folder / name, "wb") as f:
                pickle.dump(record, f)
        images.append(image)
        labels.append(label - 1)
    return np.concatenate(images), np.concatenate(labels)


@pytest.mark.parametrize("npz", [False, True])
def test_official_imagenet_reads_rows_planes_and_1_based_labels(tmp_path, npz):
    images, labels = write_official(tmp_path, "train", npz=npz, subfolder="Imagenet64_train_part1")
    source = ip.ImageNetOfficialSource(tmp_path, "train", cache_dir=tmp_path / "cache")
    assert len(source) == 50
    for i in (0, 4, 5, 49):  # first/last of a file, across a file boundary
        np.testing.assert_array_equal(source[i]["image"], images[i])
        assert source[i]["label"] == labels[i] and 0 <= labels[i] <= 999
    # The planes really are R, G, B in raster order: row 0 of file 1 pixel (r, c) channel ch.
    first = ip.read_official_batch(tmp_path / "Imagenet64_train_part1" / ("train_data_batch_1" + ".npz" * npz))
    np.testing.assert_array_equal(first[0][0, 2, 5], images[0, 2, 5])
    # Pickling the source (grain workers) carries no image data.
    import pickle
    assert len(pickle.dumps(source)) < 4096
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(source))[7]["image"], images[7])


def test_official_imagenet_converts_once_and_again_when_the_source_changes(tmp_path):
    write_official(tmp_path, "val")
    ip.ImageNetOfficialSource(tmp_path, "val")
    cached = tmp_path / "imagenet_official" / "val_data.images.npy"
    stamp = cached.stat().st_mtime_ns
    ip.ImageNetOfficialSource(tmp_path, "val")
    assert cached.stat().st_mtime_ns == stamp
    images, _ = write_official(tmp_path, "val", per_file=7, seed=1)
    source = ip.ImageNetOfficialSource(tmp_path, "val")
    assert len(source) == 7
    np.testing.assert_array_equal(source[6]["image"], images[6])


def test_official_imagenet_missing_files_are_named(tmp_path):
    write_official(tmp_path, "train")
    (tmp_path / "train_data_batch_3").unlink()
    (tmp_path / "train_data_batch_10").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing train_data_batch_3, train_data_batch_10 .*"
                                                r"Imagenet64_train_part1.zip and Imagenet64_train_part2.zip"):
        ip.ImageNetOfficialSource(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match=r"split 'val': missing val_data .*Imagenet64_val.zip"):
        ip.ImageNetOfficialSource(tmp_path, "val")
    with pytest.raises(ValueError, match=r"splits \['train', 'val'\].*got 'validation'"):
        ip.ImageNetOfficialSource(tmp_path, "validation")


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_official_imagenet_reads_every_pickle_protocol(tmp_path, protocol):
    import pickle
    data = np.arange(2 * 12, dtype=np.uint8).reshape(2, 12)
    with open(tmp_path / "val_data", "wb") as f:
        pickle.dump({"data": data, "labels": [1, 1000]}, f, protocol=protocol)
    images, labels = ip.read_official_batch(tmp_path / "val_data")
    np.testing.assert_array_equal(images, data.reshape(2, 3, 2, 2).transpose(0, 2, 3, 1))
    assert labels.tolist() == [0, 999]


def test_official_imagenet_refuses_other_pickles(tmp_path):
    import pickle
    with open(tmp_path / "val_data", "wb") as f:
        pickle.dump({"data": np.zeros((1, 12), np.uint8), "labels": [1], "x": collections.Counter()}, f)
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle collections.Counter"):
        ip.ImageNetOfficialSource(tmp_path, "val")
    with open(tmp_path / "val_data", "wb") as f:
        pickle.dump({"data": np.zeros((1, 12), np.uint8), "labels": [0]}, f)
    with pytest.raises(ValueError, match="labels must be 1..1000"):
        ip.ImageNetOfficialSource(tmp_path, "val")


def test_official_imagenet_through_the_pipeline(tmp_path):
    images, _ = write_official(tmp_path, "val", per_file=6)
    config = make_config(name="imagenet_official", data_dir=str(tmp_path), eval_split="val", image_size=8,
                         channels=3, num_levels=256, label_key=None)
    batches = list(ip.create_eval_iterator(config, 4, 0, 1))
    got = np.concatenate([b["image"] for b in batches])[np.concatenate([b["mask"] for b in batches])]
    np.testing.assert_array_equal(got, images)


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
