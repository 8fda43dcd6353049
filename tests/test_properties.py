"""Bad input, systematically: property-based tests (hypothesis) over the public API.

Every call either returns finite values of the documented shape or raises a ``ValueError``
/ ``TypeError`` (``FileNotFoundError`` for missing data) whose message names the argument
or config field at fault; never another exception type, a hang, or a silent NaN.

Covered: ``TarFlow(...)`` fields; ``apply`` (forward), ``reverse`` (every solver, Jacobi
plans, guidance, attention temperature, labels) and ``denoise`` with random shapes,
dtypes, sizes (0, 1 and wrong ones), labels and NaN/inf images; ``from_torch_state_dict``
with damaged state dicts; the image-folder and TFDS sources; ``validate_config``.

The default profile is small and derandomized (the same examples every run, a few
seconds per property on an idle CPU); ``pytest -m slow`` runs the ``*_many`` variants
with random examples and more of them.
"""

import math
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from conftest import load_parity, parity_dir  # noqa: E402
from tarflow_jax import JacobiPlan, TarFlow, configlib, input_pipeline, train_state  # noqa: E402
from tarflow_jax.convert import from_torch_state_dict  # noqa: E402
from tarflow_jax.tools.benchmark import random_variables  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMMON = dict(deadline=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                     HealthCheck.data_too_large])
FAST = settings(max_examples=12, derandomize=True, **COMMON)
MANY = settings(max_examples=60, **COMMON)


def call_clean(fn, *names):
    """``fn()``, or None when it raised a ValueError/TypeError naming one of ``names``.

    Any other exception propagates (and fails the property).
    """
    try:
        return fn()
    except (ValueError, TypeError) as e:
        assert any(name in str(e) for name in names), f"{type(e).__name__} names none of {names}: {e}"
        return None


def assert_finite(x, shape, what):
    x = np.asarray(x)
    assert x.shape == tuple(shape), f"{what}: shape {x.shape}, documented {tuple(shape)}"
    assert np.isfinite(x).all(), f"{what}: {np.size(x) - np.isfinite(x).sum()} non-finite values (silent NaN)"


# --------------------------------------------------------------------- TarFlow fields
FIELDS = dict(
    img_size=st.sampled_from([-4, 0, 1, 2, 3, 4, 6, 8, 8.0, True]),
    in_channels=st.sampled_from([-1, 0, 1, 2, 3]),
    patch_size=st.sampled_from([-1, 0, 1, 2, 3, 4]),
    channels=st.sampled_from([-32, 0, 16, 32, 48, 64]),
    num_blocks=st.sampled_from([-1, 0, 1, 2]),
    layers_per_block=st.sampled_from([-1, 0, 1, 2]),
    num_classes=st.sampled_from([-2, 0, 1, 3]),
    nvp=st.booleans(),
    head_dim=st.sampled_from([-16, 0, 16, 32]),
    expansion=st.sampled_from([-1, 0, 1, 2]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16, "float32", jnp.int32, "not_a_dtype"]),
    scan_layers=st.booleans(),
    remat=st.booleans(),
)


def check_model_fields(fields):
    model = call_clean(lambda: TarFlow(**fields), *fields)
    if model is None:
        return
    variables = random_variables(model)
    b = 2
    x = jax.random.uniform(jax.random.key(1), (b, model.img_size, model.img_size, model.in_channels),
                           minval=-1, maxval=1)
    y = jnp.arange(b) % model.num_classes if model.num_classes else None
    z, logdet = model.apply(variables, x, y)
    assert_finite(z, x.shape, "z")
    assert_finite(logdet, (b,), "logdet")
    back = model.apply(variables, z, y, method=TarFlow.reverse)
    assert_finite(back, x.shape, "reverse")
    tol = 5e-2 if model.dtype == jnp.bfloat16 else 1e-3
    assert float(jnp.max(jnp.abs(back - x))) < tol  # the inverse inverts


@FAST
@given(**FIELDS)
def test_model_fields(**fields):
    check_model_fields(fields)


@pytest.mark.slow
@MANY
@given(**FIELDS)
def test_model_fields_many(**fields):
    check_model_fields(fields)


# ----------------------------------------------------------------- inputs to apply
def images(draw, model, batch, shape_kind, dtype, poison):
    h, c = model.img_size, model.in_channels
    shape = {"ok": (batch, h, h, c), "wrong_size": (batch, h + 2, h + 2, c), "wrong_channels": (batch, h, h, c + 1),
             "3d": (h, h, c), "5d": (1, batch, h, h, c)}[shape_kind]
    x = np.random.default_rng(draw(st.integers(0, 2**16))).uniform(-1.2, 1.2, shape)
    if poison and x.size:
        x.reshape(-1)[draw(st.integers(0, x.size - 1))] = poison
    return x.astype(dtype)


@st.composite
def forward_inputs(draw, model):
    batch = draw(st.sampled_from([0, 1, 2, 3]))
    shape_kind = draw(st.sampled_from(["ok", "ok", "ok", "wrong_size", "wrong_channels", "3d", "5d"]))
    dtype = draw(st.sampled_from([np.float32, np.float32, jnp.bfloat16, np.float16, np.uint8, np.int32, np.bool_]))
    poison = draw(st.sampled_from([None, None, np.nan, np.inf, -np.inf, 100.0]))
    x = images(draw, model, batch, shape_kind, dtype, poison)
    kind = draw(st.sampled_from(["none", "valid", "valid", "minus_one", "too_big", "too_small", "float", "shape",
                                 "list"]))
    n = x.shape[0] if x.ndim else 0
    k = max(model.num_classes, 1)
    y = {"none": None, "valid": np.arange(n, dtype=np.int32) % k, "minus_one": np.full((n,), -1, np.int32),
         "too_big": np.full((n,), k, np.int32), "too_small": np.full((n,), -2, np.int32),
         "float": np.zeros((n,), np.float32), "shape": np.zeros((n + 1,), np.int32),
         "list": [0] * n}[kind]
    return x, y


def check_forward(model, variables, x, y):
    out = call_clean(lambda: model.apply(variables, x, y), "x", "labels y")
    if out is not None:
        z, logdet = out
        if np.max(np.abs(np.asarray(x, np.float32)), initial=0.0) > 1.5:
            # A pixel far outside the data range (the 100.0 poison) may overflow a randomly
            # initialised flow's exp to ±inf (hypothesis found one on 30 Nov); that is the
            # arithmetic, not a silent NaN, so only NaN fails here.
            for v, what in ((z, "z"), (logdet, "logdet")):
                assert not np.isnan(np.asarray(v)).any(), f"{what}: NaN from a finite input (silent NaN)"
            return
        assert_finite(z, x.shape, "z")
        assert_finite(logdet, x.shape[:1], "logdet")


@FAST
@given(data=st.data())
def test_forward_inputs(tiny_cond, tiny_uncond, data):
    model, variables = (tiny_cond, tiny_uncond)[data.draw(st.integers(0, 1), label="model (0: tiny_cond)")]
    x, y = data.draw(forward_inputs(model))
    check_forward(model, variables, x, y)


@pytest.mark.slow
@MANY
@given(data=st.data())
def test_forward_inputs_many(tiny_cond, tiny_uncond, data):
    model, variables = (tiny_cond, tiny_uncond)[data.draw(st.integers(0, 1), label="model (0: tiny_cond)")]
    x, y = data.draw(forward_inputs(model))
    check_forward(model, variables, x, y)


# ------------------------------------------------------------------ reverse options
@st.composite
def jacobi_plans(draw):
    segments = draw(st.one_of(st.sampled_from([-1, 0, 1, 2, 3, 16]), st.tuples(st.integers(1, 3), st.integers(1, 3)),
                              st.just((1, 2, 3))))
    max_iters = draw(st.one_of(st.sampled_from([None, 0, 1, 2, 50]), st.tuples(st.integers(1, 4), st.none())))
    tol = draw(st.sampled_from([0.0, 1e-5, 1e-2, -1.0, float("nan")]))
    init = draw(st.sampled_from(["z", "zeros", "ones"]))
    return JacobiPlan(segments=segments, max_iters=max_iters, tol=tol, init=init)


@st.composite
def reverse_options(draw, model):
    batch = draw(st.sampled_from([0, 1, 2]))
    poison = draw(st.sampled_from([None, None, None, np.nan, np.inf]))
    shape_kind = draw(st.sampled_from(["ok", "ok", "ok", "ok", "wrong_channels"]))
    z = images(draw, model, batch, shape_kind, np.float32, poison)
    n = z.shape[0]
    labels = None
    if model.num_classes and draw(st.booleans()):
        labels = draw(st.sampled_from([np.arange(n, dtype=np.int32) % model.num_classes,
                                       np.full((n,), -1, np.int32), np.full((n,), model.num_classes, np.int32)]))
    options = dict(
        guidance=draw(st.sampled_from([0.0, 1.0, 2.5, -0.5, -1.0, -2.0, float("nan"), "1"])),
        guide_what=draw(st.sampled_from(["a", "b", "ab", "c"])),
        attn_temp=draw(st.sampled_from([1.0, 0.5, 2.0, 1e-3, 100.0, 0.0, -1.0, float("nan")])),
        annealed_guidance=draw(st.booleans()),
        solver=draw(st.sampled_from(["cached", "cached", "jacobi", "jacobi", "uncached", "newton"])),
    )
    if options["solver"] != "cached" and draw(st.booleans()):
        options["jacobi"] = draw(jacobi_plans())
    options["return_iterations"] = options["solver"] == "jacobi" and draw(st.booleans())
    return z, labels, options


def check_reverse(model, variables, z, labels, options):
    names = ("z", "labels y", *options, "JacobiPlan")
    out = call_clean(lambda: model.apply(variables, z, labels, method=TarFlow.reverse, **options), *names)
    if out is None:
        return
    if options.get("return_iterations"):
        out, iterations = out
        assert iterations.shape[0] == model.num_blocks and np.asarray(iterations).min() >= 0
    assert_finite(out, z.shape, f"reverse {options}")


@FAST
@given(data=st.data())
def test_reverse_options(tiny_cond, tiny_uncond, data):
    model, variables = (tiny_cond, tiny_uncond)[data.draw(st.integers(0, 1), label="model (0: tiny_cond)")]
    check_reverse(model, variables, *data.draw(reverse_options(model)))


@pytest.mark.slow
@MANY
@given(data=st.data())
def test_reverse_options_many(tiny_cond, tiny_uncond, data):
    model, variables = (tiny_cond, tiny_uncond)[data.draw(st.integers(0, 1), label="model (0: tiny_cond)")]
    check_reverse(model, variables, *data.draw(reverse_options(model)))


@FAST
@given(guidance=st.floats(-3, 4), attn_temp=st.one_of(st.floats(-2, 10), st.just(float("nan"))))
def test_reverse_traced_guidance_and_temperature_stay_finite(tiny_cond, guidance, attn_temp):
    """Under jit the same values cannot raise: they must still give finite samples."""
    model, variables = tiny_cond
    out = traced_reverse(model)(variables, jnp.float32(guidance), jnp.float32(attn_temp))
    assert_finite(out, (2, 8, 8, 1), f"guidance {guidance}, attn_temp {attn_temp}")


_TRACED = {}


def traced_reverse(model):
    if model not in _TRACED:
        z = jax.random.normal(jax.random.key(0), (2, model.img_size, model.img_size, model.in_channels))
        y = jnp.array([0, 1])
        _TRACED[model] = jax.jit(lambda v, g, t: model.apply(v, z, y, guidance=g, attn_temp=t,
                                                             method=TarFlow.reverse))
    return _TRACED[model]


# -------------------------------------------------------------------------- denoise
@FAST
@given(data=st.data())
def test_denoise_inputs(tiny_cond, tiny_uncond, data):
    model, variables = (tiny_cond, tiny_uncond)[data.draw(st.integers(0, 1), label="model (0: tiny_cond)")]
    x, y = data.draw(forward_inputs(model))
    noise_std = data.draw(st.sampled_from([0.05, 0.0, 1.0, -0.1, float("nan"), float("inf")]))
    scale = data.draw(st.sampled_from([1.0, 0.0, 5.0, -1.0, float("nan")]))
    out = call_clean(lambda: model.apply(variables, x, y, noise_std, scale, method=TarFlow.denoise),
                     "x", "labels y", "noise_std", "step_scale")
    if out is not None:
        assert_finite(out, x.shape, "denoise")
        assert float(np.abs(np.asarray(out)).max(initial=0)) <= 1.0


# ---------------------------------------------------------------- state dict import
def mutate_state_dict(draw, state):
    state = dict(state)
    keys = sorted(k for k in state if not k.endswith("attn_mask"))  # buffers the import ignores
    kind = draw(st.sampled_from(["none", "drop", "extra", "shape", "nan", "dtype", "string", "int_key",
                                 "layer_out_of_range", "negative_layer", "prefix"]))
    key = draw(st.sampled_from(keys))
    if kind == "drop":
        del state[key]
    elif kind == "extra":
        state["blocks.0.something.weight"] = np.zeros((2, 2), np.float32)
    elif kind == "shape":
        state[key] = np.zeros(tuple(s + 1 for s in np.shape(state[key])) or (2,), np.float32)
    elif kind == "nan":
        value = np.array(state[key], np.float32)
        value.reshape(-1)[0] = np.nan
        state[key] = value
    elif kind == "dtype":
        state[key] = np.asarray(state[key]).astype(draw(st.sampled_from([np.float16, np.float64, np.int32])))
    elif kind == "string":
        state[key] = "not a tensor"
    elif kind == "int_key":
        state[7] = state.pop(key)
    elif kind in ("layer_out_of_range", "negative_layer"):
        layer_keys = [k for k in keys if ".attn_blocks.0." in k]
        if layer_keys:
            k = draw(st.sampled_from(layer_keys))
            layer = "9" if kind == "layer_out_of_range" else "-1"
            state[k.replace(".attn_blocks.0.", f".attn_blocks.{layer}.")] = state[k]
    elif kind == "prefix":
        state = {f"module.{k}": v for k, v in state.items()}
    return state, kind


@pytest.fixture(scope="module")
def reference_state():
    path = parity_dir()
    if path is None:
        pytest.skip("parity vectors not found: set TARFLOW_PARITY_DIR")
    cfg, state, _ = load_parity(path, "cond_gray8")
    model = TarFlow(img_size=cfg["img_size"], in_channels=cfg["in_channels"], patch_size=cfg["patch_size"],
                    channels=cfg["channels"], num_blocks=cfg["num_blocks"], layers_per_block=cfg["layers_per_block"],
                    num_classes=cfg["num_classes"], nvp=bool(cfg.get("nvp", True)))
    return Named(f"cond_gray8 state dict, {len(state)} keys", (model, state))


class Named:
    """A fixture value with a short repr (hypothesis prints its test's arguments)."""

    def __init__(self, name, value):
        self.name, self.value = name, value

    def __repr__(self):
        return self.name


@FAST
@given(data=st.data())
def test_state_dict_import(reference_state, data):
    model, state = reference_state.value
    for scan in (False, True):
        target = model.clone(scan_layers=scan)
        mutated, kind = mutate_state_dict(data.draw, state)
        variables = call_clean(lambda: from_torch_state_dict(mutated, target), "state dict", "key")
        if variables is None:
            continue
        assert kind in ("none", "dtype", "prefix"), f"a state dict damaged by {kind!r} was accepted"
        x = jnp.zeros((1, model.img_size, model.img_size, model.in_channels))
        z, logdet = target.apply(variables, x, jnp.array([1]))
        assert_finite(z, x.shape, "z")
        assert_finite(logdet, (1,), "logdet")


# --------------------------------------------------------------------- data sources
def folder_config(root, **dataset):
    base = dict(name="folder", tfds_name=None, data_dir=str(root), train_split="train", eval_split="train",
                image_key="image", label_key="label", image_size=8, channels=3, num_levels=256,
                random_flip=False, resize="center_crop")
    return ml_collections.ConfigDict(dict(batch_size=2, seed=0, data_workers=0, dataset={**base, **dataset},
                                          model=dict(num_classes=0)))


@st.composite
def folder_contents(draw):
    files = []
    for i in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["png", "png", "jpg", "corrupt", "empty", "text", "tiny", "tall"]))
        mode = draw(st.sampled_from(["RGB", "L", "RGBA", "P", "I;16", "1"]))
        files.append((draw(st.sampled_from(["a", "b"])), f"{i}", kind, mode))
    return files


def write_folder(root: pathlib.Path, files) -> None:
    (root / "train").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for cls, name, kind, mode in files:
        folder = root / "train" / cls
        folder.mkdir(exist_ok=True)
        if kind in ("corrupt", "empty"):
            (folder / f"{name}.png").write_bytes(b"\x89PNG garbage" if kind == "corrupt" else b"")
        elif kind == "text":
            (folder / f"{name}.txt").write_text("not an image")
        else:
            size = {"tiny": (1, 1), "tall": (3, 40)}.get(kind, (12, 10))
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            image = Image.fromarray(pixels).convert(mode if mode != "I;16" else "I")
            if mode == "I;16":
                image = Image.fromarray(rng.integers(0, 65535, (size[1], size[0]), dtype=np.uint16))
            image.save(folder / f"{name}.{'jpg' if kind == 'jpg' else 'png'}")


@FAST
@given(files=folder_contents(), image_size=st.sampled_from([1, 4, 8]), channels=st.sampled_from([1, 3, 2]),
       resize=st.sampled_from([None, "center_crop", "stretch"]), num_levels=st.sampled_from([256, 2, 1, 300]))
def test_image_folder_source(files, image_size, channels, resize, num_levels):
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        write_folder(root, files)
        config = folder_config(root, image_size=image_size, channels=channels, resize=resize, num_levels=num_levels)
        check_source(config, image_size, channels, num_levels)


def check_source(config, image_size, channels, num_levels):
    names = ("config.dataset", "image", str(config.dataset.get("data_dir")))

    def read_all():
        source = input_pipeline.create_source(config, "train")
        preprocess = input_pipeline.Preprocess(config)
        return [preprocess.map(source[i]) for i in range(len(source))]

    try:
        records = call_clean(read_all, *names)
    except FileNotFoundError as e:
        assert "expected layout" in str(e) or "not prepared" in str(e), e
        return
    for record in records or []:
        assert record["image"].shape == (image_size, image_size, channels) and record["image"].dtype == np.uint8
        assert int(record["image"].max()) < num_levels


@FAST
@given(image_key=st.sampled_from(["image", "image", "picture"]), label_key=st.sampled_from(["label", None, "id"]),
       image_size=st.sampled_from([32, 16, 33]), channels=st.sampled_from([3, 1, 4]),
       resize=st.sampled_from([None, "center_crop"]), num_levels=st.sampled_from([256, 16, 0, 257]))
def test_tfds_source(tmp_path_factory, image_key, label_key, image_size, channels, resize, num_levels):
    tfds = pytest.importorskip("tensorflow_datasets")
    root = tmp_path_factory.mktemp("tfds")
    config = folder_config(root, name="tfds", tfds_name="cifar10", image_key=image_key, label_key=label_key,
                           image_size=image_size, channels=channels, resize=resize, num_levels=num_levels,
                           eval_split="test")
    with tfds.testing.mock_data(num_examples=3):
        check_source(config, image_size, channels, num_levels)


# ---------------------------------------------------------------- config validator
INT_FIELDS = ("batch_size", "num_train_steps", "warmup_steps", "log_every_steps", "checkpoint_every_steps",
              "eval_every_steps", "sample_every_steps", "keep_checkpoints", "max_consecutive_skips",
              "data_workers", "eval.batch_size", "eval.num_draws", "sample.batch_size", "sample.num_samples",
              "sample.grid_size", "model.patch_size", "model.width", "model.num_blocks", "model.layers_per_block",
              "model.num_classes", "model.head_dim", "model.expansion", "dataset.image_size", "dataset.channels",
              "dataset.num_levels", "mesh.data", "mesh.fsdp", "mesh.tensor")
FLOAT_FIELDS = ("learning_rate", "min_learning_rate", "b1", "b2", "weight_decay", "grad_clip_norm", "ema_decay",
                "label_drop", "noise_std", "max_skipped_fraction", "sample.guidance", "sample.attn_temp",
                "sample.denoise_scale")
STR_FIELDS = {"noise": ["uniform", "gaussian", "salt"], "model.dtype": ["float32", "bfloat16", "int8", "fp32"],
              "sample.guide_what": ["a", "ab", "c"], "sample.solver": ["cached", "jacobi", "newton"],
              "dataset.name": ["digits", "tfds", "mnist"], "dataset.resize": ["center_crop", "stretch"]}


@st.composite
def config_overrides(draw):
    changes = {}
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["int", "float", "str"]))
        if kind == "int":
            changes[draw(st.sampled_from(INT_FIELDS))] = draw(st.sampled_from([-3, -1, 0, 1, 2, 3, 5, 8, 64, 100]))
        elif kind == "float":
            changes[draw(st.sampled_from(FLOAT_FIELDS))] = draw(st.sampled_from(
                [-1.0, 0.0, 1e-4, 0.5, 0.999, 1.0, 2.0, float("nan"), float("inf")]))
        else:
            field = draw(st.sampled_from(sorted(STR_FIELDS)))
            changes[field] = draw(st.sampled_from(STR_FIELDS[field]))
    return changes


def digits_smoke():
    import importlib.util
    spec = importlib.util.spec_from_file_location("digits", ROOT / "configs" / "digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("smoke")


def check_config(changes):
    config = digits_smoke()
    for field, value in changes.items():
        node = config
        for part in field.split(".")[:-1]:
            node = node[part]
        node[field.split(".")[-1]] = value
    names = [f"config.{field}" for field in changes] + ["config.mesh", "config.batch_size", "config.dataset",
                                                        "config.model"]
    ok = call_clean(lambda: train_state.validate_config(config, num_devices=1) or True, *names)
    if not ok:
        return
    # A config the validator passes builds its model, optimizer and learning-rate schedule.
    model = train_state.create_model(config)
    tx, schedule = train_state.create_optimizer(config)
    rates = [float(schedule(s)) for s in (0, config.num_train_steps // 2, config.num_train_steps)]
    assert all(math.isfinite(r) and r >= 0 for r in rates), rates
    assert model.img_size == config.dataset.image_size


@FAST
@given(changes=config_overrides())
def test_config_validator(changes):
    check_config(changes)


@pytest.mark.slow
@settings(max_examples=400, **COMMON)  # cheap: nothing is compiled
@given(changes=config_overrides())
def test_config_validator_many(changes):
    check_config(changes)
