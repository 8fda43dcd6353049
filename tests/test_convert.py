"""Importing reference weights: .pth files, scanned layouts, helpful errors; the conversion CLI."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import tarflow_jax
from conftest import load_parity
from tarflow_jax import TarFlow, configlib, convert
from tarflow_jax.tools import convert as convert_tool
from tarflow_jax.convert import from_torch_state_dict


def test_pth_file_and_torch_tensors(parity_path, tmp_path):
    torch = pytest.importorskip("torch", reason="reading .pth files needs the test extra (torch)")
    cfg, state, data = load_parity(parity_path, "cond_gray8")
    path = tmp_path / "model.pth"
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
    model = TarFlow(**cfg)
    from_file = from_torch_state_dict(path, model)
    from_arrays = from_torch_state_dict(state, model)
    z, _ = model.apply(from_file, data["x"], data["y"])
    assert np.abs(np.asarray(z) - data["z"]).max() <= 1e-4
    np.testing.assert_array_equal(from_file["params"]["blocks_1"]["class_embed"],
                                  from_arrays["params"]["blocks_1"]["class_embed"])


def test_vp_prior_table_imported(parity_path):
    cfg, state, _ = load_parity(parity_path, "vp_rgb8")
    variables = from_torch_state_dict(state, TarFlow(**cfg, scan_layers=True))
    np.testing.assert_array_equal(variables["prior"]["var"], state["var"])


def test_mismatch_names_key_and_shapes(parity_path):
    cfg, state, _ = load_parity(parity_path, "uncond_rgb16")
    wider = TarFlow(**{**cfg, "channels": 192})
    with pytest.raises(ValueError, match=r"'blocks\.0\.pos_embed' has shape \(64, 128\).*expects \(64, 192\)"):
        from_torch_state_dict(state, wider)
    with pytest.raises(ValueError, match=r"names layer 1, but the model has layers 0..0 \(layers_per_block=1\)"):
        from_torch_state_dict(state, TarFlow(**{**cfg, "layers_per_block": 1}))
    with pytest.raises(ValueError, match="leaves .* variables unset, first params/blocks_4"):
        from_torch_state_dict(state, TarFlow(**{**cfg, "num_blocks": 5}))
    with pytest.raises(ValueError, match="'blocks.0.class_embed'.*no place"):
        from_torch_state_dict({**state, "blocks.0.class_embed": np.zeros((10, 1, 128))}, TarFlow(**cfg))


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        from_torch_state_dict("/nonexistent/model.pth", TarFlow(img_size=8, in_channels=1, channels=64,
                                                                 num_blocks=1, layers_per_block=1))


# ------------------------------------------------------------------ the conversion command line
ROOT = pathlib.Path(__file__).resolve().parents[1]
TORCH_REASON = "writing/reading .pth files needs the test extra (torch)"
# The smallest sampling run the saved config asks for.
SMALL_SAMPLING = ["--config.sample.num_samples=4", "--config.sample.batch_size=4", "--config.sample.grid_size=4"]


def model_overrides(cfg: dict) -> list[str]:
    """``--config.model.*`` / ``--config.dataset.*`` flags for a parity file's model (TarFlow field names)."""
    return [f"--config.{configlib.config_path(k)}={v}" for k, v in cfg.items()]


def write_pth(torch, state: dict, path: pathlib.Path, wrapper: str | None = None) -> pathlib.Path:
    tensors = {k: torch.from_numpy(v) for k, v in state.items()}
    torch.save({wrapper: tensors, "epoch": 3} if wrapper else tensors, path)
    return path


def run_convert(capsys, *args) -> tuple[int, str, str]:
    code = convert_tool.main(["tarflow_jax.tools.convert", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def converted_cond(parity_path, tmp_path_factory):
    """``cond_gray8`` saved as a wrapped .pth and converted with configs/digits.py plus overrides."""
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    cfg, state, data = load_parity(parity_path, "cond_gray8")
    tmp = tmp_path_factory.mktemp("convert")
    pth = write_pth(torch, state, tmp / "cond_gray8.pth", wrapper="model")
    out = tmp / "workdir"
    code = convert_tool.main(["tarflow_jax.tools.convert", f"--torch_checkpoint={pth}", "--config=configs/digits.py",
                         f"--out={out}", *model_overrides(cfg), *SMALL_SAMPLING])
    assert code == 0
    return out, pth, cfg, data


def test_cli_converted_workdir_reproduces_parity(converted_cond):
    out, _, cfg, data = converted_cond
    assert (out / "checkpoints" / "0" / "state").is_dir() and not (out / "checkpoints" / "0" / "data").exists()
    assert json.loads((out / "config.json").read_text())["model"]["num_blocks"] == cfg["num_blocks"]
    flow = tarflow_jax.load(str(out))
    model, variables, config = flow.model, flow.variables, flow.config
    assert config.model.width == cfg["channels"] and model.num_classes == cfg["num_classes"]
    z, logdet = flow.encode(data["x"], data["y"])
    assert np.abs(np.asarray(z) - data["z"]).max() <= 1e-4
    n = np.prod(data["x"].shape[1:])
    assert np.abs(np.asarray(logdet) - data["logdet_mean"] * n).max() <= 1e-5 * n
    # digits keeps an EMA: it starts as the converted weights themselves.
    raw = tarflow_jax.load(str(out), use_ema=False).variables
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(raw)):
        np.testing.assert_array_equal(a, b)
    record = json.loads((out / "converted_from.json").read_text())
    assert record["inferred_from_shapes"]["num_classes"] == 10 and record["num_params"] > 0


def test_cli_vp_prior_and_no_ema(parity_path, tmp_path, capsys):
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    cfg, state, data = load_parity(parity_path, "vp_rgb8")
    pth = write_pth(torch, state, tmp_path / "vp.pth")
    code, out, err = run_convert(capsys, f"--torch_checkpoint={pth}", "--config=configs/digits.py",
                                 f"--out={tmp_path / 'vp'}", "--config.ema_decay=0", *model_overrides(cfg))
    assert code == 0, err
    assert "--mode=sample" in out
    flow = tarflow_jax.load(str(tmp_path / "vp"))
    np.testing.assert_array_equal(flow.variables["prior"]["var"], state["var"])
    z, _ = flow.model.apply(flow.variables, data["x"])
    assert np.abs(np.asarray(z) - data["z"]).max() <= 1e-4


def test_cli_mismatch_names_the_config_field(converted_cond, tmp_path, capsys):
    _, pth, cfg, _ = converted_cond
    base = [f"--torch_checkpoint={pth}", "--config=configs/digits.py", f"--out={tmp_path / 'bad'}",
            *model_overrides(cfg)]
    code, _, err = run_convert(capsys, *base, "--config.model.width=192")
    assert code == 1
    assert "config.model.width=192, but the checkpoint has width=128" in err
    assert "try: --config.model.width=128" in err
    assert "'blocks.0.pos_embed' has shape (16, 128)" in err and "expects (16, 192)" in err  # the key-level error
    code, _, err = run_convert(capsys, *base, "--config.model.num_blocks=4", "--config.model.num_classes=0")
    assert code == 1 and "config.model.num_blocks=4, but the checkpoint has num_blocks=2" in err
    assert "config.model.num_classes=0, but the checkpoint has num_classes=10" in err
    code, _, err = run_convert(capsys, *base, "--config.model.patch_size=4")
    assert code == 1 and "config.model.patch_size=4, but the checkpoint has patch_size=2" in err
    code, _, err = run_convert(capsys, *base, "--config.dataset.channels=3")
    assert code == 1 and "config.dataset.channels=3, but the checkpoint has channels=1" in err
    assert "try: --config.dataset.channels=1" in err
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_cli_help_and_usage_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, text, _ = run_convert(capsys, "--help")
    assert code == 0 and "--torch_checkpoint" in text and "--config.model" in text
    code, _, err = run_convert(capsys, "--config=configs/digits.py", f"--out={tmp_path}")
    assert code == 2 and "missing --torch_checkpoint" in err
    code, _, err = run_convert(capsys, "--config=configs/digits.py", "--config.model.widht=3",
                               "--torch_checkpoint=x.pth", f"--out={tmp_path}")
    assert code == 2 and "widht" in err
    code, _, err = run_convert(capsys, f"--torch_checkpoint={tmp_path / 'none.pth'}", "--config=configs/digits.py",
                               f"--out={tmp_path / 'x'}")
    assert code == 1 and "no checkpoint file" in err


def afhq_like_shapes(patch=8, width=768, blocks=8, layers=8, classes=3, channels=3, size=256) -> dict:
    """Zero-stride arrays with the shapes of the authors' ``afhq_model_8_768_8_8_0.07.pth``."""
    t, d = (size // patch) ** 2, patch * patch * channels
    shape = lambda *s: np.broadcast_to(np.float32(0), s)
    state = {"var": shape(t, d)}
    for k in range(blocks):
        state |= {f"blocks.{k}.pos_embed": shape(t, width), f"blocks.{k}.proj_in.weight": shape(width, d),
                  f"blocks.{k}.proj_out.weight": shape(2 * d, width),
                  f"blocks.{k}.class_embed": shape(classes, 1, width)}
        for l in range(layers):
            state[f"blocks.{k}.attn_blocks.{l}.mlp.main.0.weight"] = shape(4 * width, width)
    return state


def load_config(name: str, arg: str | None = None):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_afhq_shapes_against_configs():
    state = afhq_like_shapes()
    assert convert.infer_model_fields(state) == {
        "num_blocks": 8, "layers_per_block": 8, "num_tokens": 1024, "channels": 768, "token_dim": 192,
        "nvp": True, "num_classes": 3, "expansion": 4}
    fields = lambda *arg: configlib.model_kwargs(load_config("afhq256", *arg))
    assert convert.config_mismatches(state, fields()) == []
    smoke = {m[0]: (m[1], m[2]) for m in convert.config_mismatches(state, fields("smoke"))}
    assert smoke == {"channels": (64, 768), "num_blocks": (2, 8), "layers_per_block": (1, 8),
                     "img_size": (16, 256), "patch_size": (2, 8)}
    text = convert.describe_mismatches(convert.config_mismatches(state, {**fields(), "patch_size": 4}))
    assert "config.model.patch_size=4, but the checkpoint has patch_size=8" in text
    assert text.endswith("try: --config.model.patch_size=8")
    with pytest.raises(ValueError, match="not a TarFlow state dict"):
        convert.infer_model_fields({"fc.weight": np.zeros((2, 2))})


def test_cli_existing_workdir_refused(converted_cond, tmp_path, capsys):
    out, pth, cfg, _ = converted_cond
    code, _, err = run_convert(capsys, f"--torch_checkpoint={pth}", "--config=configs/digits.py", f"--out={out}",
                               *model_overrides(cfg))
    assert code == 1 and "already holds checkpoint steps ['0']" in err


def test_main_samples_from_converted_workdir(converted_cond):
    out, _, cfg, _ = converted_cond
    # --config is given, so these sampling settings apply; the model comes from the workdir.
    cmd = [sys.executable, "-m", "tarflow_jax.main", f"--workdir={out}", "--mode=sample",
           "--config=configs/digits.py", "--config.sample.num_samples=6", "--config.sample.batch_size=6"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    samples = np.load(out / "samples" / "samples_00000000.npz")
    assert samples["arr_0"].shape == (6, 8, 8, 1) and samples["arr_0"].dtype == np.uint8
    assert samples["labels"].shape == (6,) and "NaN samples: 0" in result.stdout
