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
from tarflow_jax import TarFlow, configlib, evaluate, input_pipeline, sharding, workdir as workdir_lib
from tarflow_jax.convert import from_torch_state_dict
from tarflow_jax.tools import convert as convert_tool

ROOT = pathlib.Path(__file__).resolve().parents[1]
TORCH_REASON = "writing .pth files needs the test extra (torch)"


def reference_state_dict(variables, model: TarFlow) -> dict[str, np.ndarray]:
    """Flax variables of ``model`` as a reference (authors') ``state_dict`` of NumPy arrays.

    The inverse of :func:`tarflow_jax.convert.from_torch_state_dict`: ``blocks.<k>.proj_in``,
    ``pos_embed``, ``class_embed (C, 1, W)``, ``attn_blocks.<l>.attention.{norm,qkv,proj}``,
    ``attn_blocks.<l>.mlp.{norm,main.0,main.2}``, ``proj_out``, the ``attn_mask`` buffer, and
    ``var``; torch ``Linear`` weights are ``(out, in)``.
    """
    w = model.channels
    state = {"var": np.asarray(variables["prior"]["var"], np.float32)}
    for k in range(model.num_blocks):
        p = jax.tree.map(np.asarray, variables["params"][f"blocks_{k}"])
        if model.scan_layers:  # stacked layers (leading layer axis) -> layers_<l>
            stacked = p["transformer"].pop("layers")
            for l in range(model.layers_per_block):
                p["transformer"][f"layers_{l}"] = jax.tree.map(lambda a, l=l: a[l], stacked)
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
    """``root/val/{cat,dog,wild}/*.png`` (AFHQ's layout): random RGB images of another size."""
    rng = np.random.default_rng(0)
    for name in ("cat", "dog", "wild"):
        folder = root / "val" / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(folder / f"{i}.png")


AFHQ = "configs/afhq256.py:smoke"  # the AFHQ recipe (3 classes, σ 0.07, guidance 3.4 annealed), tiny model
LABELS = jnp.array([0, 1, 2, 0, 1, 2])


@pytest.fixture(scope="module")
def afhq(tmp_path_factory):
    """A tiny AFHQ-recipe model saved as a plain state-dict .pth, converted with the convert tool."""
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    tmp = tmp_path_factory.mktemp("afhq")
    config = configlib.from_file(AFHQ)
    model = configlib.create_model(config)
    variables = random_variables(model, seed=11)
    pth = tmp / "afhq_model_tiny.pth"
    torch.save({k: torch.tensor(v) for k, v in reference_state_dict(variables, model).items()}, pth)
    out = tmp / "afhq_authors"
    assert convert_tool.main(["convert", f"--torch_checkpoint={pth}", f"--config={AFHQ}", f"--out={out}"]) == 0
    folder = tmp / "afhq_data"
    write_image_folder(folder)
    return {"out": out, "pth": pth, "model": model, "variables": variables, "folder": folder}


def test_convert_then_load_keeps_the_weights_and_the_recipe(afhq):
    flow = tarflow_jax.load(str(afhq["out"]))
    assert isinstance(flow, tarflow_jax.TrainedFlow)
    assert flow.image_shape == (16, 16, 3) and flow.num_classes == 3 and flow.model.dtype == jnp.bfloat16
    assert (flow.num_levels, flow.noise_std) == (256, 0.07)
    assert flow.options.guidance == 3.4 and flow.options.annealed_guidance and flow.options.denoise
    for a, b in zip(jax.tree.leaves(flow.variables), jax.tree.leaves(afhq["variables"])):
        np.testing.assert_array_equal(a, b)
    # the .pth loads in one line too, without writing a workdir
    direct = tarflow_jax.load(str(afhq["pth"]), config=AFHQ)
    for a, b in zip(jax.tree.leaves(direct.variables), jax.tree.leaves(flow.variables)):
        np.testing.assert_array_equal(a, b)
    assert direct.options == flow.options and direct.noise_std == flow.noise_std
    with pytest.raises(ValueError, match="pass config= describing its model"):
        tarflow_jax.load(str(afhq["pth"]))
    with pytest.raises(ValueError, match="config.model.width=32, but the checkpoint has width=64"):
        tarflow_jax.load(str(afhq["pth"]), config=_with_width(32))


def _with_width(width):
    config = configlib.from_file(AFHQ)
    config.model.width = width
    return config


def test_sample_with_the_papers_afhq_guidance_to_a_png_grid(afhq):
    flow = tarflow_jax.load(str(afhq["out"]))
    key = jax.random.key(0)
    images = flow.sample(key, 6, LABELS)                  # guidance 3.4, annealed, denoised at σ = 0.07
    # the same as the lower-level calls with the AFHQ recipe written out
    model, variables = flow.model, flow.variables
    z = jax.random.normal(key, (6, 16, 16, 3))
    raw = jax.jit(lambda v, z: model.apply(v, z, LABELS, guidance=3.4, annealed_guidance=True,
                                           method=TarFlow.reverse))(variables, z)
    clean = jax.jit(lambda v, x: model.apply(v, x, LABELS, 0.07, method=TarFlow.denoise))(variables, raw)
    np.testing.assert_allclose(images, jnp.where(jnp.isfinite(clean), clean, raw), atol=1e-5)
    path = afhq["out"] / "samples" / "afhq_grid.png"
    pixels = flow.to_uint8(images)                      # as the trainer's sample grids: truncation for σ > 0
    np.testing.assert_array_equal(pixels, workdir_lib.to_uint8(np.asarray(images), 256, "gaussian"))
    workdir_lib.write_png(path, workdir_lib.image_grid(pixels, columns=3))
    assert Image.open(path).size == (3 * 17 + 1, 2 * 17 + 1)


def test_bits_per_dim_on_an_image_folder_matches_the_evaluator(afhq):
    flow = tarflow_jax.load(str(afhq["out"]))
    config = flow.config
    config.dataset.data_dir = str(afhq["folder"])       # <data_dir>/val/{cat,dog,wild}/*.png
    given, unlabelled, count = 0.0, 0.0, 0
    for i, batch in enumerate(input_pipeline.create_eval_iterator(config, config.eval.batch_size)):
        key = jax.random.fold_in(jax.random.PRNGKey(0), i)   # the evaluator's draws
        keep = batch["mask"]
        given += float(jnp.sum(jnp.where(keep, flow.bits_per_dim(batch["image"], batch["label"], key=key), 0)))
        unlabelled += float(jnp.sum(jnp.where(keep, flow.bits_per_dim(batch["image"], key=key), 0)))
        count += int(keep.sum())
    mesh = sharding.create_mesh(config.mesh)
    expected = evaluate.evaluate_bits_per_dim(flow.model, flow.variables, config, mesh, num_draws=1, seed=0)
    assert count == expected["num_examples"] == 6
    np.testing.assert_allclose(unlabelled / count, expected["bpd"], rtol=1e-5)
    np.testing.assert_allclose(given / count, expected["conditional"]["bpd"], rtol=1e-5)
    assert 0 < given / count < 40
