"""The config schema: overrides of None-valued fields, old field names, one source for the image geometry."""

import json
import pathlib

import jax.numpy as jnp
import pytest
from absl import flags
from ml_collections import config_flags

from tarflow_jax import configlib, workdir

ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse(argv):
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=fv, sys_argv=argv)
    fv(argv)
    return fv.config


def test_none_valued_fields_take_command_line_overrides(monkeypatch):
    monkeypatch.chdir(ROOT)
    config = parse(["prog", "--config=configs/imagenet64_bpd.py", "--config.dataset.data_dir=gs://b/tfds",
                    "--config.dataset.resize=center_crop", "--config.dataset.label_key=label",
                    "--config.sample.labels=(3, 4)"])
    assert config.dataset.data_dir == "gs://b/tfds" and config.dataset.resize == "center_crop"
    assert config.dataset.label_key == "label" and config.sample.labels == (3, 4)
    assert parse(["prog", "--config=configs/digits.py"]).dataset.data_dir is None  # still None by default
    assert parse(["prog", "--config=configs/digits.py", "--config.sample.labels=7"]).sample.labels == (7,)
    with pytest.raises(flags.Error):  # fields keep their types
        parse(["prog", "--config=configs/digits.py", "--config.dataset.image_size=big"])


def test_model_comes_from_config_dataset_geometry(monkeypatch):
    monkeypatch.chdir(ROOT)
    config = parse(["prog", "--config=configs/digits.py", "--config.model.width=64"])
    assert "img_size" not in config.model and "in_channels" not in config.model and "channels" not in config.model
    model = configlib.create_model(config)
    assert (model.img_size, model.in_channels, model.channels) == (8, 1, 64)
    assert model.dtype == jnp.float32 and model.scan_layers is False  # TarFlow's default, and the config's


def test_old_run_config_json_still_loads(tmp_path):
    old = configlib.base_config().to_dict()
    old["model"] = {"img_size": 8, "in_channels": 1, "patch_size": 2, "channels": 96, "num_blocks": 2,
                    "layers_per_block": 1, "num_classes": 10, "nvp": True, "head_dim": 32, "expansion": 4,
                    "dtype": "float32", "scan_layers": True, "remat": False}
    old["dataset"].update(image_size=8, channels=1, data_dir=None)
    old.pop("profile")  # a field added later takes today's default
    (tmp_path / "config.json").write_text(json.dumps(old))
    with pytest.warns(FutureWarning, match=r"config.model.\{channels, img_size, in_channels\}"):
        config = workdir.load_config(tmp_path)
    assert config.model.width == 96 and "channels" not in config.model and "img_size" not in config.model
    assert config.profile is False and config.dataset.data_dir is None
    assert config.dataset.get_type("data_dir") is str  # the stored null is still a typed placeholder
    model = configlib.create_model(config)
    assert (model.img_size, model.in_channels, model.channels, model.head_dim) == (8, 1, 96, 32)
    old["model"]["img_size"] = 16  # contradicts dataset.image_size
    (tmp_path / "config.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="config.model.img_size=16 differs from config.dataset.image_size=8"), \
            pytest.warns(FutureWarning):
        workdir.load_config(tmp_path)


def test_model_field_config_paths():
    assert configlib.config_path("channels") == "model.width"
    assert configlib.config_path("img_size") == "dataset.image_size"
    assert configlib.config_path("in_channels") == "dataset.channels"
    assert configlib.config_path("patch_size") == "model.patch_size"
