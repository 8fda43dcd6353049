"""Importing reference weights: .pth files, scanned layouts, helpful errors."""

import numpy as np
import pytest

from conftest import load_parity
from tarflow_jax import TarFlow
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
    with pytest.raises(ValueError, match="names layer 1, but the model has layers_per_block=1"):
        from_torch_state_dict(state, TarFlow(**{**cfg, "layers_per_block": 1}))
    with pytest.raises(ValueError, match="leaves .* variables unset, first params/blocks_4"):
        from_torch_state_dict(state, TarFlow(**{**cfg, "num_blocks": 5}))
    with pytest.raises(ValueError, match="'blocks.0.class_embed'.*no place"):
        from_torch_state_dict({**state, "blocks.0.class_embed": np.zeros((10, 1, 128))}, TarFlow(**cfg))


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        from_torch_state_dict("/nonexistent/model.pth", TarFlow(img_size=8, in_channels=1, channels=64,
                                                                 num_blocks=1, layers_per_block=1))
