"""The authors' AFHQ checkpoint path end to end, on a tiny .pth with the same key layout.

convert (the command line's code) -> ``tarflow_jax.load`` -> ``sample`` with the AFHQ
config's guidance (3.4, annealed) -> PNG grid; and -> bits/dim over an image folder, the
same numbers as the trainer's evaluation. No download: the test writes the ``.pth`` itself
from random weights, in the reference ``state_dict`` layout.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import tarflow_jax
from conftest import load_parity, random_variables
from tarflow_jax import TarFlow
from tarflow_jax.convert import from_torch_state_dict

ROOT = pathlib.Path(__file__).resolve().parents[1]
TORCH_REASON = "writing .pth files needs the test extra (torch)"


def reference_state_dict(variables, model: TarFlow) -> dict[str, np.ndarray]:
    """Flax variables of an unscanned ``model`` as a reference (authors') ``state_dict`` of arrays.

    The inverse of :func:`tarflow_jax.convert.from_torch_state_dict`: ``blocks.<k>.proj_in``,
    ``pos_embed``, ``class_embed (C, 1, W)``, ``attn_blocks.<l>.attention.{norm,qkv,proj}``,
    ``attn_blocks.<l>.mlp.{norm,main.0,main.2}``, ``proj_out``, the ``attn_mask`` buffer, and
    ``var``; torch ``Linear`` weights are ``(out, in)``.
    """
    w = model.channels
    state = {"var": np.asarray(variables["prior"]["var"], np.float32)}
    for k in range(model.num_blocks):
        p = jax.tree.map(np.asarray, variables["params"][f"blocks_{k}"])
        pre = f"blocks.{k}."
        state[pre + "proj_in.weight"], state[pre + "proj_in.bias"] = p["proj_in"]["kernel"].T, p["proj_in"]["bias"]
        state[pre + "pos_embed"] = p["pos_embed"]
        if model.num_classes:
            state[pre + "class_embed"] = p["class_embed"][:, None, :]
        state[pre + "proj_out.weight"], state[pre + "proj_out.bias"] = p["proj_out"]["kernel"].T, p["proj_out"]["bias"]
        state[pre + "attn_mask"] = np.tril(np.ones((model.num_tokens,) * 2, np.float32))
        for l in range(model.layers_per_block):
            layer, lp = p["transformer"][f"layers_{l}"], f"{pre}attn_blocks.{l}."
            state[lp + "attention.norm.weight"] = layer["attn_norm"]["scale"]
            state[lp + "attention.norm.bias"] = layer["attn_norm"]["bias"]
            state[lp + "attention.qkv.weight"] = layer["qkv"]["kernel"].reshape(w, 3 * w).T
            state[lp + "attention.qkv.bias"] = layer["qkv"]["bias"].reshape(3 * w)
            state[lp + "attention.proj.weight"] = layer["attn_out"]["kernel"].reshape(w, w).T
            state[lp + "attention.proj.bias"] = layer["attn_out"]["bias"]
            state[lp + "mlp.norm.weight"] = layer["mlp_norm"]["scale"]
            state[lp + "mlp.norm.bias"] = layer["mlp_norm"]["bias"]
            state[lp + "mlp.main.0.weight"] = layer["mlp_in"]["kernel"].T
            state[lp + "mlp.main.0.bias"] = layer["mlp_in"]["bias"]
            state[lp + "mlp.main.2.weight"] = layer["mlp_out"]["kernel"].T
            state[lp + "mlp.main.2.bias"] = layer["mlp_out"]["bias"]
    return {k: np.ascontiguousarray(v) for k, v in state.items()}


def test_reference_writer_reproduces_the_authors_layout(parity_path):
    """The writer gives back the reference's own state dict (keys, shapes, values) for a parity model."""
    cfg, state, _ = load_parity(parity_path, "cond_gray8")
    model = TarFlow(**cfg)
    written = reference_state_dict(from_torch_state_dict(state, model), model)
    assert set(written) == set(state)
    for key, value in state.items():
        assert written[key].shape == value.shape, key
        np.testing.assert_array_equal(written[key], value, err_msg=key)


def write_image_folder(root: pathlib.Path, size=(20, 24), per_class=2) -> None:
    """``root/test/{cat,dog,wild}/*.png``: random RGB images of another size (resized and cropped)."""
    rng = np.random.default_rng(0)
    for name in ("cat", "dog", "wild"):
        folder = root / "test" / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(folder / f"{i}.png")
