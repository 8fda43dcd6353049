"""The config schema: overrides of None-valued fields, old field names, one source for the image geometry."""

import ast
import json
import pathlib
import re

import jax.numpy as jnp
import pytest
from absl import flags
from ml_collections import config_flags

from tarflow_jax import configlib, main, workdir
from tarflow_jax.tools import convert as convert_tool, fid as fid_tool

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


# ---------------------------------------------------------------- documented overrides
DOCUMENTED = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "launch").iterdir())]
OVERRIDE = re.compile(r"--config\.([A-Za-z_][\w.]*)=([^\s`'\"\\)]*)")
PROGRAMS = (("tarflow_jax.tools.fid", "fid"), ("tarflow_jax.fid_cli", "fid"),
            ("tarflow_jax.tools.convert", "convert"), ("tarflow_jax.convert", "convert"),
            ("tarflow_jax.main", "main"), ("launch/", "main"))
PLACEHOLDER = "/data/placeholder"


def logical_lines(text: str):
    """(line, in_code, block_id) with shell continuations joined."""
    out, in_code, block, pending = [], False, 0, ""
    for raw in text.splitlines():
        if raw.strip().startswith("```"):
            in_code, block = not in_code, block + 1
            continue
        pending += raw.rstrip("\\") + " " if raw.rstrip().endswith("\\") else raw
        if not raw.rstrip().endswith("\\"):
            out.append((pending, in_code, block))
            pending = ""
    return out


def documented_overrides():
    """Every ``--config.FIELD=VALUE`` in the README, docs and launch scripts, with its command's context."""
    cases = []
    for path in DOCUMENTED:
        text = path.read_text()
        shell = path.suffix != ".md"
        default_config = re.search(r'CONFIG="\$\{CONFIG:-([^}]+)\}"', text)
        program_of_block, last_config = {}, None
        for line, in_code, block in logical_lines(text):
            code = in_code or shell
            program = next((name for key, name in PROGRAMS if key in line), None)
            if program and code:
                program_of_block[block] = program
            program = program or (program_of_block.get(block, "main") if code else "main")
            given = re.search(r"--config=(configs/(?!NAME)[\w.:]+)", line)  # not the configs/NAME.py pattern
            last_config = given.group(1) if given else last_config
            for field, value in OVERRIDE.findall(line):
                value = value.rstrip(".,;")  # the end of a sentence
                if value in ("", "…") or "FIELD" in field or value == "VALUE":
                    continue  # a placeholder in prose, not a command
                named = re.search(r"\bCONFIG=(configs/\S+\.py)", line)
                if given:
                    config = given.group(1)
                elif named:
                    config = named.group(1)
                elif default_config and shell:
                    config = default_config.group(1)
                else:
                    config = last_config  # the command this override belongs to named it earlier
                mode = re.search(r"--mode=(\w+)", line)
                cases.append(pytest.param(
                    program, config, mode.group(1) if mode and "$" not in mode.group(0) else "train", field,
                    re.sub(r"\$\{?\w+\}?", PLACEHOLDER, value),
                    id=f"{path.relative_to(ROOT)}:{field}={value}"))
    return cases


def expected_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_with(program: str, argv: list[str], tmp_path: pathlib.Path):
    """The parsed config after ``argv`` went through ``program``'s own flag parser."""
    if program == "main":
        fv = flags.FlagValues()
        main.define_flags(fv)
        main.parse_flags(["main", f"--workdir={tmp_path}", *argv], fv)
        return fv.config
    tool = {"fid": fid_tool, "convert": convert_tool}[program]
    argv = [program, *argv]
    fv = tool.define_flags(argv)
    fv(argv)
    return fv.config


def test_documented_overrides_are_collected():
    cases = documented_overrides()
    fields = {case.values[3] for case in cases}
    assert len(cases) >= 25 and {"dataset.data_dir", "model.remat", "mesh.fsdp", "sample.guidance"} <= fields
    assert {case.values[0] for case in cases} == {"main", "fid", "convert"}
    assert {case.values[2] for case in cases} >= {"train", "eval", "sample"}


@pytest.mark.parametrize("program,config,mode,field,value", documented_overrides())
def test_every_documented_override_parses(program, config, mode, field, value, tmp_path, monkeypatch):
    """Each override the docs tell users to pass goes through the real parser with its documented type."""
    monkeypatch.chdir(ROOT)
    argv = [f"--config.{field}={value}"]
    if config:
        argv.insert(0, f"--config={config}")
    if program == "main":
        argv.append(f"--mode={mode}")
        if not config and mode != "train":  # eval/sample without --config: the run's stored config
            workdir.save_config(tmp_path, configlib.base_config())
    if program == "fid":
        argv = ["--compute_ref_stats", *argv]
    parsed = parse_with(program, argv, tmp_path)
    node = parsed
    for part in field.split(".")[:-1]:
        node = node[part]
    actual = node[field.split(".")[-1]]
    assert actual == expected_value(value), (field, value, actual)


def test_overrides_in_eval_and_sample_mode_parse_against_the_stored_config(tmp_path):
    stored = configlib.base_config()  # dataset.data_dir None, sample.labels None: placeholders
    workdir.save_config(tmp_path, stored)
    for mode in ("eval", "sample"):
        config = parse_with("main", [f"--mode={mode}", "--config.dataset.data_dir=gs://b/tfds",
                                     "--config.dataset.resize=center_crop", "--config.sample.labels=(1, 2)",
                                     "--config.eval.num_draws=4"], tmp_path)
        assert config.dataset.data_dir == "gs://b/tfds" and config.dataset.resize == "center_crop"
        assert config.sample.labels == (1, 2) and config.eval.num_draws == 4


@pytest.mark.parametrize("argv, message", [
    (["--config=configs/digits.py"], "--workdir must have a value"),  # no --workdir
    (["--workdir=W", "--mode=bogus"], "--mode"),
    (["--workdir=W", "--config=configs/no_such_config.py"], "a config file that exists"),
    (["--workdir=W", "--config=configs/digits.py", "--config.no_such_group.batch_size=3"], "has no field"),
    (["--workdir=W", "--config=configs/digits.py", "--config.batch_size=abc"], "batch_size"),
])
def test_main_flag_errors_exit_with_a_message(argv, message, tmp_path, monkeypatch):
    """Bad command lines stop in main's flag parser with one FATAL line, not a traceback."""
    monkeypatch.chdir(ROOT)
    fv = flags.FlagValues()
    main.define_flags(fv)
    argv = [a.replace("--workdir=W", f"--workdir={tmp_path / 'run'}") for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main.parse_flags(["main", *argv], fv)
    assert isinstance(exit_info.value.code, str) and exit_info.value.code.startswith("FATAL")
    assert message in exit_info.value.code
    assert not (tmp_path / "run").exists()
