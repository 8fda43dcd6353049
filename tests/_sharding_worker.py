"""Runs on 8 simulated CPU devices (started by ``tests/test_sharding.py``); prints one JSON line.

The XLA flag that makes 8 host devices must be set before JAX starts, hence a separate
process. Checks: training steps on several meshes vs one device, which arrays are really
sharded, sharded sampling and evaluation vs one device (and no collectives inside the
sampling loops), and checkpoints restored onto a different mesh.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import functools  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tarflow_jax import checkpointing, evaluate, generate, input_pipeline, sharding, train, train_state  # noqa: E402

MESHES = {  # name -> config.mesh
    "data8": dict(data=-1, fsdp=1, tensor=1),
    "data4_fsdp2": dict(data=-1, fsdp=2, tensor=1),
    "data2_fsdp2_tensor2": dict(data=-1, fsdp=2, tensor=2),
}
MLP_IN = ("blocks_0", "transformer", "layers_0", "mlp_in", "kernel")
QKV = ("blocks_1", "transformer", "layers_0", "qkv", "kernel")


def get_config():
    spec = importlib.util.spec_from_file_location("digits", ROOT / "configs" / "digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("smoke")
    config.model.width = 128  # two heads, so tensor=2 splits them
    config.batch_size = 16
    config.async_checkpointing = False
    return config


def make_mesh(config, mesh_config, num_devices=8):
    config = config.copy_and_resolve_references()
    config.mesh.update(mesh_config)
    return sharding.create_mesh(config.mesh, jax.devices()[:num_devices])


def leaf(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def loop_collectives(hlo: str) -> tuple[int, int]:
    """(collectives inside while loops, collectives in all) of a compiled HLO module's text."""
    pattern = re.compile(r"\b(all-gather|all-reduce|collective-permute|all-to-all|reduce-scatter)(-start)?\(")
    comps, cur = {}, None
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if m and not line.startswith(" "):
            cur = m.group(1)
            comps[cur] = []
        elif cur and line.strip() == "}":
            cur = None
        elif cur:
            comps[cur].append(line)

    def called(name):
        out = set()
        for line in comps.get(name, []):
            out |= set(re.findall(r"(?:body|condition|calls|to_apply)=%([\w.\-]+)", line))
            for group in re.findall(r"(?:calls|branch_computations)=\{([^}]*)\}", line):
                out |= set(re.findall(r"%([\w.\-]+)", group))
        return out

    stack = [b for lines in comps.values() for line in lines if " while(" in line
             for b in re.findall(r"(?:body|condition)=%([\w.\-]+)", line)]
    assert stack, "no while loop found in the sampling program"
    seen = set()
    while stack:
        name = stack.pop()
        if name not in seen:
            seen.add(name)
            stack += called(name)
    inside = sum(bool(pattern.search(line)) for name in seen for line in comps.get(name, []))
    total = sum(bool(pattern.search(line)) for lines in comps.values() for line in lines)
    return inside, total


def train_on(config, mesh, batches, model, tx, schedule):
    """3 train steps as in ``train_and_evaluate``; returns the state, losses, and shard shapes."""
    batch_sharding = sharding.batch_sharding(mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        state, shardings = train_state.create_train_state(config, model, tx, mesh)
        step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, schedule=schedule,
                                         config=config),
                       in_shardings=(shardings, batch_sharding),
                       out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))
        losses = []
        for local in batches:
            state, metrics = step(state, input_pipeline.make_global_batch(local, batch_sharding))
            losses.append(float(metrics["loss"]))
    mu = [a for path, a in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
          if "mu" in jax.tree_util.keystr(path) and "mlp_in" in jax.tree_util.keystr(path)
          and "kernel" in jax.tree_util.keystr(path)][0]
    shards = {
        "mlp_in": [list(leaf(state.params, MLP_IN).shape),
                   list(leaf(state.params, MLP_IN).addressable_shards[0].data.shape),
                   str(leaf(state.params, MLP_IN).sharding.spec)],
        "qkv": [list(leaf(state.params, QKV).shape),
                list(leaf(state.params, QKV).addressable_shards[0].data.shape),
                str(leaf(state.params, QKV).sharding.spec)],
        "ema_mlp_in": list(leaf(state.ema_params, MLP_IN).addressable_shards[0].data.shape),
        "adam_mu_mlp_in": list(mu.addressable_shards[0].data.shape),
    }
    return state, shardings, losses, shards


def main():
    start = time.time()
    out = {"num_devices": jax.device_count()}
    config = get_config()
    model = train_state.create_model(config)
    tx, schedule = train_state.create_optimizer(config)
    iterator = input_pipeline.create_train_iterator(config)
    batches = [next(iterator) for _ in range(3)]

    # ---- training: 1 device vs meshes
    one = make_mesh(config, MESHES["data8"], num_devices=1)
    ref_state, _, ref_losses, _ = train_on(config, one, batches, model, tx, schedule)
    ref_params = host(ref_state.params)
    out["train"] = {"one_device": {"losses": ref_losses}}
    states = {}
    for name, mesh_config in MESHES.items():
        mesh = make_mesh(config, mesh_config)
        state, shardings, losses, shards = train_on(config, mesh, batches, model, tx, schedule)
        states[name] = (mesh, state, shardings)
        out["train"][name] = {
            "mesh": dict(mesh.shape), "losses": losses, "shards": shards,
            "max_param_diff": max_diff(host(state.params), ref_params),
            "max_ema_diff": max_diff(host(state.ema_params), host(ref_state.ema_params)),
            "max_opt_diff": max_diff(host(state.opt_state), host(ref_state.opt_state)),
        }
    out["train_seconds"] = time.time() - start

    # ---- sampling: sharded (shard_map) over 8 devices vs the same sampler on one device
    t = time.time()
    rng = np.random.default_rng(0)
    perturbed = jax.tree.map(lambda a: a + 0.02 * rng.standard_normal(a.shape).astype(a.dtype)
                             if a.ndim >= 2 else a, ref_params)  # a flow far from the identity
    variables_host = {"params": perturbed, "prior": {"var": np.asarray(ref_state.prior_var)}}
    labels = np.arange(6, dtype=np.int32) % 10  # 6: not a multiple of 8 devices (padding)
    key = jax.random.PRNGKey(3)
    device0 = jax.devices()[0]
    reference = {}
    for denoise in (False, True):
        cfg = config.copy_and_resolve_references()
        cfg.noise_std = 0.1
        draw_one = generate.sharded_sample_fn(model, cfg, one, denoise=denoise)  # one device
        reference[denoise] = np.asarray(draw_one(jax.device_put(variables_host, device0), key, labels))
    out["sample"] = {"std": float(np.std(reference[False]))}
    for name, denoise, in_context in (("data8", False, False), ("data2_fsdp2_tensor2", False, True),
                                      ("data2_fsdp2_tensor2", True, True)):
        mesh, _, shardings = states[name]
        cfg = config.copy_and_resolve_references()
        cfg.noise_std = 0.1
        variables = {"params": jax.device_put(perturbed, shardings.params),
                     "prior": {"var": jax.device_put(variables_host["prior"]["var"],
                                                     sharding.replicated(mesh))}}
        draw = generate.sharded_sample_fn(model, cfg, mesh, denoise=denoise)
        if in_context:
            with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
                images = draw(variables, key, labels)
        else:
            images = draw(variables, key, labels)
        entry = {"max_diff": float(np.max(np.abs(np.asarray(images) - reference[denoise]))),
                 "replicated": images.sharding.is_fully_replicated, "shape": list(images.shape),
                 "params_sharded": leaf(variables["params"], MLP_IN).addressable_shards[0].data.shape
                 != leaf(variables["params"], MLP_IN).shape}
        if not denoise:
            jitted = next(c.cell_contents for c in draw.__closure__
                          if hasattr(c.cell_contents, "lower"))
            put = lambda a: jax.device_put(a, sharding.replicated(mesh))
            hlo = jitted.lower(variables, put(np.asarray(key)), put(labels)).compile().as_text()
            entry["loop_collectives"], entry["collectives"] = loop_collectives(hlo)
        out["sample"][f"{name}{'_denoise' if denoise else ''}"] = entry
    # generate() end to end on the sharded mesh equals generate() on one device
    mesh, _, shardings = states["data2_fsdp2_tensor2"]
    sharded_vars = {"params": jax.device_put(perturbed, shardings.params),
                    "prior": {"var": jax.device_put(variables_host["prior"]["var"], sharding.replicated(mesh))}}
    gen = generate.generate(model, sharded_vars, config, mesh, 10, seed=1, progress=False)
    # as `main --mode=sample` does: variables from `checkpointing.load` on device 0, a mesh of all 8
    gen_one = generate.generate(model, jax.device_put(variables_host, device0), config,
                                states["data8"][0], 10, seed=1, progress=False)
    out["generate"] = {"shape": list(gen["images"].shape),
                       "equal": bool(np.array_equal(gen["images"], gen_one["images"])),
                       "max_uint8_diff": int(np.max(np.abs(gen["images"].astype(int) - gen_one["images"]))),
                       "labels_equal": bool(np.array_equal(gen["labels"], gen_one["labels"]))}
    out["sample_seconds"] = time.time() - t

    # ---- evaluation: per-device forward on a 2x2x2 mesh vs one device
    t = time.time()
    cfg = config.copy_and_resolve_references()
    cfg.eval.batch_size = 152  # 297 examples: 2 batches, the second padded
    mesh, state, _ = states["data2_fsdp2_tensor2"]
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        sharded = evaluate.evaluate_bits_per_dim(model, state.variables(False), cfg, mesh)
    single = evaluate.evaluate_bits_per_dim(model, host(state.variables(False)), cfg, one)
    # as `main --mode=eval` does: variables on device 0 (from `load`), a mesh of all 8 devices
    loaded = evaluate.evaluate_bits_per_dim(model, jax.device_put(host(state.variables(False)), device0),
                                            cfg, states["data8"][0])
    out["eval"] = {"sharded": sharded, "one_device": single, "device0_variables_data8": loaded}
    out["eval_seconds"] = time.time() - t

    # ---- checkpoints restored onto another mesh
    t = time.time()
    other = config.copy_and_resolve_references()
    other.seed = 1  # targets with different values, so a no-op restore would show
    out["checkpoint"] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cases = (("fsdp2_to_one", states["data4_fsdp2"], one),
                 ("one_to_fsdp2_tensor2", (one, ref_state, None), states["data2_fsdp2_tensor2"][0]))
        for name, (src_mesh, src_state, _), dst_mesh in cases:
            workdir = str(pathlib.Path(tmp) / name)
            with jax.set_mesh(src_mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
                manager = checkpointing.create_manager(workdir, config)
                checkpointing.save(manager, 3, src_state, None)
                manager.wait_until_finished()
                manager.close()
            with jax.set_mesh(dst_mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
                target, _ = train_state.create_train_state(other, model, tx, dst_mesh)
                manager = checkpointing.create_manager(workdir, config)
                restored = checkpointing.restore(manager, target)
                manager.close()
            saved, got = host(src_state), host(restored)
            kernel = leaf(restored.params, MLP_IN)
            out["checkpoint"][name] = {
                "equal": all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(got))),
                "num_leaves": len(jax.tree.leaves(got)),
                "target_differed": max_diff(host(target.params), saved.params) > 0,
                "src_devices": src_mesh.size, "dst_devices": dst_mesh.size,
                "restored_spec": str(kernel.sharding.spec),
                "restored_on_dst_mesh": set(kernel.sharding.device_set) == set(dst_mesh.devices.flat),
                "restored_shard_shape": list(kernel.addressable_shards[0].data.shape),
                "step": int(restored.step),
            }
    out["checkpoint_seconds"] = time.time() - t
    out["seconds"] = time.time() - start
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
