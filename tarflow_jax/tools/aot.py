"""Compile-only TPU dry run: does a config compile, fit and shard on a TPU slice? (No TPU needed.)

::

    python -m tarflow_jax.aot --config=configs/imagenet64_cond.py --topology=v5p-32
    python -m tarflow_jax.aot --config=configs/imagenet64_bpd.py --topology=v5e-16 \\
        --config.batch_size=128 --programs=train --json=dry_run.json

With ``libtpu`` installed (``pip install 'tarflow_jax[tpu]'``), JAX can build *compile-only*
TPU devices for any slice shape (``jax.experimental.topologies.get_topology_desc``) on a
machine without a TPU. This tool builds the config's mesh over those devices and compiles
the three programs a run executes, through the builders the run itself uses:

* ``train``: :func:`tarflow_jax.train.jit_train_step` on the abstract train state of
  :func:`tarflow_jax.train_state.abstract_train_state` (the state's real shardings, donated) and a
  global batch of ``config.batch_size``;
* ``eval``: :func:`tarflow_jax.evaluate.jit_eval_step` (bits/dim, ``config.eval.num_draws``
  draws) on a batch of ``config.eval.batch_size``, with the EMA or raw parameters as the
  run passes them;
* ``sample``: :func:`tarflow_jax.generate.jit_sample_step` with ``config.sample``'s options
  (solver, guidance, denoising) on ``config.sample.batch_size`` latents.

For each it prints (``--json=FILE`` writes the same):

* **HBM per chip** from ``compiled.memory_analysis()``: the compiler's own allocation plan
  (arguments, temporaries, outputs, and the bytes outputs share with donated arguments),
  against the HBM the compiler may use on that chip (:data:`CHIPS`) and the headroom;
* **FLOPs and HBM bytes per chip**, loop-aware (:mod:`tarflow_jax.tools.hlo_stats`; XLA's
  ``cost_analysis()`` counts a loop body once and is printed beside them for reference);
* a **roofline step time**: ``max(FLOPs / peak, bytes / HBM bandwidth)`` with the chip's
  published bfloat16 peak (float32 matmuls at ``HIGHEST`` precision cost 6 bfloat16 passes,
  ``HIGH`` 3), which bound dominates, and the **model FLOPs utilisation** that time implies
  (analytic model FLOPs, :func:`tarflow_jax.tools.benchmark.flop_counts`, per chip over the
  roofline time and the peak). These are estimates of an ideal execution, not measurements;
* **collectives** by kind with how many run per step and their bytes per chip, read from
  the optimised HLO;
* **warnings**: what the compiler logged while compiling (e.g. involuntary full
  rematerialization) and parameters over 1 MiB left replicated although the mesh shards.

It exits with status 1 naming the program, its per-chip need and the capacity when a
program does not fit (or the compiler refuses it), with the config change that would fit.

``--topology`` takes the names users type: ``v5e-16``/``v5litepod-16``, ``v6e-64`` (these count
chips), ``v5p-32``, ``v4-64`` (these count TensorCores: two per chip, so v5p-32 is 16 chips),
or an explicit shape ``v5p:2x4x4``, ``v5e:4x8``. ``--num_slices=N`` compiles for N such slices
joined over the data-centre network (the mesh's ``dcn`` axis).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tarflow_jax import configlib, evaluate, generate, layers, sharding, train, train_state
from tarflow_jax.tools import benchmark, hlo_stats

GIB = 1024 ** 3


# ------------------------------------------------------------------------------ chips
@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-chip figures of one TPU generation.

    ``bf16_tflops``, ``hbm_gb`` and ``hbm_gbps`` are the published per-chip figures (the
    ``source`` page); ``usable_hbm_gib`` is what the TPU compiler plans against (libtpu
    0.0.42.1 reports it in its out-of-memory message: "exceeds available HBM (…G)";
    ``tests/test_aot.py`` checks it).
    """

    generation: str
    device_kind: str
    bf16_tflops: float
    hbm_gb: float
    hbm_gbps: float
    ici_gbps: float  # bidirectional inter-chip interconnect bandwidth per chip, GB/s
    usable_hbm_gib: float
    cores_per_chip: int  # TensorCores per chip: slice names v4-N / v5p-N count cores
    dims: int  # 2-D (v5e, v6e) or 3-D (v4, v5p) torus
    chip_config: str  # get_topology_desc's chip_config_name
    source: str


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", "TPU v4", 275.0, 32 * 1.073741824, 1200.0, 300.0, 30.75, 2, 3, "megacore",
               "https://cloud.google.com/tpu/docs/v4 (275 TFLOPs bf16, 32 GiB HBM2, 1200 GB/s)"),
    "v5e": Chip("v5e", "TPU v5 lite", 197.0, 16.0, 819.0, 400.0, 15.75, 1, 2, "default",
                "https://cloud.google.com/tpu/docs/v5e (197 TFLOPs bf16, 16 GB HBM2, 819 GB/s)"),
    "v5p": Chip("v5p", "TPU v5", 459.0, 95.0, 2765.0, 1200.0, 95.74, 2, 3, "megacore",
                "https://cloud.google.com/tpu/docs/v5p (459 TFLOPs bf16, 95 GB HBM2e, 2765 GB/s)"),
    "v6e": Chip("v6e", "TPU v6 lite", 918.0, 32.0, 1640.0, 800.0, 31.25, 1, 2, "default",
                "https://cloud.google.com/tpu/docs/v6e (918 TFLOPs bf16, 32 GB HBM, 1640 GB/s)"),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v5": "v5p", "trillium": "v6e"}
# Slice shapes by chip count (Cloud TPU docs' supported topologies).
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
              256: (16, 16)}
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
              128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16),
              2048: (8, 16, 16), 4096: (16, 16, 16), 6144: (16, 16, 24)}


@dataclasses.dataclass(frozen=True)
class Topology:
    chip: Chip
    shape: tuple[int, ...]
    num_slices: int = 1

    @property
    def chips_per_slice(self) -> int:
        return math.prod(self.shape)

    @property
    def num_chips(self) -> int:
        return self.chips_per_slice * self.num_slices

    @property
    def topology_name(self) -> str:
        return f"{self.chip.generation}:{'x'.join(map(str, self.shape))}"

    @property
    def slice_name(self) -> str:
        """The Cloud TPU accelerator type (``v5p-32``: cores for v4/v5p, chips otherwise)."""
        return f"{self.chip.generation}-{self.chips_per_slice * self.chip.cores_per_chip}"

    def describe(self) -> str:
        slices = f" × {self.num_slices} slices" if self.num_slices > 1 else ""
        return (f"{self.slice_name} ({self.topology_name}, {self.chips_per_slice} chips of "
                f"{self.chip.device_kind}){slices}")


def parse_topology(name: str, num_slices: int = 1) -> Topology:
    """A slice from the name users type: ``v5e-16``, ``v5p-32``, ``v6e-64``, ``v4-64``, ``v5p:2x4x4``.

    ``v4-N`` and ``v5p-N`` count TensorCores (two per chip), ``v5e-N``/``v6e-N`` count chips.

    Raises:
      ValueError: an unknown generation, a size with no standard slice shape, a shape of the
        wrong rank, or ``num_slices < 1``.
    """
    text = name.strip().lower()
    if num_slices < 1:
        raise ValueError(f"--num_slices must be >= 1; got {num_slices}")
    match = re.fullmatch(r"(?:tpu)?(v\d[a-z]*|trillium)(?::|-)(.+)", text)
    if not match:
        raise ValueError(f"--topology={name!r}: expected e.g. v5e-16, v5p-32, v6e-64, v4-64 or v5p:2x4x4")
    generation, size = match.groups()
    generation = _ALIASES.get(generation, generation)
    if generation not in CHIPS:
        raise ValueError(f"--topology={name!r}: unknown TPU generation {generation!r}; known: "
                         f"{', '.join(CHIPS)}")
    chip = CHIPS[generation]
    table = _SHAPES_3D if chip.dims == 3 else _SHAPES_2D
    if "x" in size:
        shape = tuple(int(d) for d in size.split("x"))
        if chip.dims == 2 and len(shape) == 3 and shape[2] == 1:
            shape = shape[:2]
        if len(shape) != chip.dims or min(shape) < 1:
            raise ValueError(f"--topology={name!r}: {generation} slices are {chip.dims}-D "
                             f"(e.g. {generation}:{'x'.join(map(str, next(iter(table.values()))))})")
        return Topology(chip, shape, num_slices)
    count = int(size)
    if count % chip.cores_per_chip:
        raise ValueError(f"--topology={name!r}: {generation}-N counts TensorCores ({chip.cores_per_chip} "
                         f"per chip); N must be even")
    chips = count // chip.cores_per_chip
    if chips not in table:
        sizes = ", ".join(f"{generation}-{c * chip.cores_per_chip}" for c in table)
        raise ValueError(f"--topology={name!r}: no standard {generation} slice of {chips} chips; "
                         f"known: {sizes} (or give the shape, e.g. {generation}:2x2x4)")
    return Topology(chip, table[chips], num_slices)


def _libtpu_requirement() -> str:
    """The libtpu requirement ``jax[tpu]`` pins for the installed jax (e.g. ``libtpu==0.0.42.*``)."""
    try:
        for req in importlib.metadata.requires("jax") or []:
            if req.startswith("libtpu") and 'extra == "tpu"' in req:
                return req.split(";")[0].strip()
    except importlib.metadata.PackageNotFoundError:
        pass
    return "libtpu"


def missing_libtpu_message() -> str | None:
    """What to install when ``libtpu`` (the TPU compiler) is missing; ``None`` when present."""
    if importlib.util.find_spec("libtpu") is not None:
        return None
    return (f"the TPU dry run needs libtpu (the TPU compiler), which is not installed.\n"
            f"Install the version jax[tpu] pins for jax {jax.__version__}:\n"
            f"    pip install 'tarflow_jax[tpu]'        # from a checkout: pip install -e '.[tpu]'\n"
            f"or  pip install \"{_libtpu_requirement()}\"   # what pip install \"jax[tpu]=={jax.__version__}\" adds")


def prepare_environment() -> None:
    """Lets libtpu build compile-only devices on a host without TPU chips, quietly.

    Run before JAX initialises a backend. Without TPU chips attached it keeps JAX itself on
    the CPU, lets libtpu load although another process holds ``/tmp/libtpu_lockfile``
    (``ALLOW_MULTIPLE_LIBTPU_LOAD``), and names a worker and accelerator type so libtpu does
    not print its metadata-lookup warnings. On a TPU VM it changes nothing.
    """
    try:
        from jax._src import hardware_utils

        chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
    except Exception:  # noqa: BLE001 - no way to tell: assume no TPU
        chips = 0
    if chips:
        return
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
    if not jax.config.jax_platforms:
        jax.config.update("jax_platforms", "cpu")


def compile_only_devices(topology: Topology) -> list[Any]:
    """The slice's compile-only TPU devices (needs libtpu; no TPU hardware)."""
    from jax.experimental import topologies

    bounds = tuple(min(b, s) for b, s in zip((2, 2, 1), tuple(topology.shape) + (1,) * 3))
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=topology.topology_name, chip_config_name=topology.chip.chip_config,
        chips_per_host_bounds=bounds, num_slices=topology.num_slices)
    return list(desc.devices)


# ---------------------------------------------------------------------- compiling
@contextlib.contextmanager
def captured_stderr():
    """Collects what native code writes to file descriptor 2 (the compiler's log lines)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        lines: list[str] = []
        try:
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(tmp.read().decode(errors="replace").splitlines())


_LOG_LINE = re.compile(r"^([WE])\d{4} [\d:. ]+\s*\d*\s+([\w./-]+:\d+)\]\s*(.*)$")
_NOISE = ("libtpu_init_utils", "could not determine TPU", "TPU_WORKER_HOSTNAMES", "Logging before InitGoogle",
          "oneDNN", "absl::InitializeLog")


def compiler_warnings(lines: Sequence[str]) -> list[str]:
    """Warning and error lines the compiler logged (libtpu start-up noise dropped)."""
    out = []
    for line in lines:
        match = _LOG_LINE.match(line.strip())
        if match and not any(n in line for n in _NOISE):
            out.append(f"{match.group(2)}: {match.group(3)}"[:400])
    return list(dict.fromkeys(out))


_OOM = re.compile(r"memory required for ([\w ]+?) \(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)")
_UNIT = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}


@dataclasses.dataclass
class Program:
    """What one compiled (or refused) program needs and costs per chip."""

    name: str
    description: str
    fits: bool
    error: str | None = None
    memory: dict[str, int] = dataclasses.field(default_factory=dict)
    need_bytes: float = 0.0
    capacity_bytes: float = 0.0
    hlo: dict[str, Any] = dataclasses.field(default_factory=dict)
    xla_cost: dict[str, float] = dataclasses.field(default_factory=dict)
    model_flops_per_chip: float = 0.0
    roofline: dict[str, Any] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)
    compile_seconds: float = 0.0
    suggestion: str | None = None
    loops: list[tuple[str, int]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["loops"] = [list(x) for x in self.loops]
        return d


def _roofline(chip: Chip, bf16_flops: float, hbm_bytes: float, model_flops: float,
              collective_bytes: float) -> dict[str, Any]:
    compute = bf16_flops / (chip.bf16_tflops * 1e12)
    memory = hbm_bytes / (chip.hbm_gbps * 1e9)
    step = max(compute, memory)
    return {"compute_s": compute, "hbm_s": memory, "step_s": step,
            "bound": "compute" if compute >= memory else "HBM bandwidth",
            "ici_s": collective_bytes / (chip.ici_gbps * 1e9),
            "mfu": model_flops / (step * chip.bf16_tflops * 1e12) if step > 0 else None}


def compile_program(name: str, description: str, jitted: Any, args: Sequence[Any], chip: Chip,
                    model_flops_per_chip: float, hlo_dir: str | None = None) -> Program:
    """Traces, lowers and compiles ``jitted(*args)`` for the compile-only devices; analyses the result."""
    program = Program(name, description, fits=True, capacity_bytes=chip.usable_hbm_gib * GIB,
                      model_flops_per_chip=model_flops_per_chip)
    start = time.perf_counter()
    with captured_stderr() as log:
        try:
            compiled = jitted.trace(*args).lower().compile()
        except Exception as e:  # noqa: BLE001 - the compiler's refusal is a result here
            compiled, error = None, e
    program.compile_seconds = time.perf_counter() - start
    program.warnings = compiler_warnings(log)
    if compiled is None:
        text = str(error)
        program.fits = False
        program.error = f"{type(error).__name__}: {text.strip().splitlines()[0][:600] if text.strip() else ''}"
        match = _OOM.search(text)
        if match:
            program.need_bytes = float(match.group(2)) * _UNIT[match.group(3)]
            program.capacity_bytes = float(match.group(4)) * _UNIT[match.group(5)]
            program.memory = {"temp_bytes": int(program.need_bytes)}
        elif "RESOURCE_EXHAUSTED" not in text:
            raise error
        return program
    m = compiled.memory_analysis()
    program.memory = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in
                      ("argument", "output", "alias", "temp", "generated_code")}
    program.need_bytes = float(m.argument_size_in_bytes + m.output_size_in_bytes
                               - m.alias_size_in_bytes + m.temp_size_in_bytes)
    program.fits = program.need_bytes <= program.capacity_bytes
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    program.xla_cost = {k: float(cost[k]) for k in ("flops", "bytes accessed", "optimal_seconds")
                        if cost and k in cost}
    text = compiled.as_text()
    if hlo_dir:
        os.makedirs(hlo_dir, exist_ok=True)
        with open(os.path.join(hlo_dir, f"{name}.hlo.txt"), "w") as f:
            f.write(text)
    stats = hlo_stats.analyze(text, splash_block=lambda tokens: layers.splash_block_sizes(tokens).block_q)
    program.hlo = stats.to_dict()
    program.loops = stats.loops
    collective_bytes = sum(c["bytes"] for c in stats.collectives.values())
    program.roofline = _roofline(chip, stats.bf16_equivalent_flops, stats.bytes_accessed,
                                 model_flops_per_chip, collective_bytes)
    return program


# ------------------------------------------------------------------------ the run
def replicated_params_warnings(abstract_params: Any, mesh: Any, limit: int = 1 << 20) -> list[str]:
    """Parameters over ``limit`` bytes left whole on every chip although the mesh shards parameters."""
    if mesh.shape["fsdp"] * mesh.shape["tensor"] == 1:
        return []
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params):
        size = int(np.prod(leaf.shape)) * leaf.dtype.itemsize
        if size > limit and leaf.sharding.is_fully_replicated:
            out.append(f"parameter {jax.tree_util.keystr(path)} {tuple(leaf.shape)} "
                       f"({size / 2**20:.1f} MiB) is replicated on every chip")
    return out


def dry_run(config: Any, topology: Topology, programs: Sequence[str] = ("train", "eval", "sample"),
            hlo_dir: str | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Compiles a config's programs for ``topology``'s compile-only devices; returns the report.

    Raises:
      ValueError: an inconsistent config for this slice (e.g. a batch the mesh cannot split),
        before anything compiles; an unknown program name.
    """
    unknown = set(programs) - {"train", "eval", "sample"}
    if unknown:
        raise ValueError(f"--programs: unknown {sorted(unknown)}; choose from train, eval, sample")
    devices = compile_only_devices(topology)
    train_state.validate_config(config, len(devices), devices[0].platform)
    mesh = sharding.create_mesh(config.mesh, devices)
    model = configlib.create_model(config)
    tx, schedule = train_state.create_optimizer(config)
    chip = topology.chip
    chips = len(devices)
    report: dict[str, Any] = {
        "topology": topology.describe(), "slice": topology.slice_name, "num_slices": topology.num_slices,
        "chips": chips, "chip": dataclasses.asdict(chip), "mesh": dict(mesh.shape),
        "model": {k: config.model[k] for k in config.model}, "programs": []}
    abstract_state, state_shardings = train_state.abstract_train_state(config, model, tx, mesh)
    variables = abstract_state.variables(config.eval.use_ema)
    flops = lambda batch: benchmark.flop_counts(model, batch)
    replicated = sharding.replicated(mesh)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)
    jobs = []
    if "train" in programs:
        jobs.append(("train", f"train step, global batch {config.batch_size}",
                     lambda: train.jit_train_step(config, model, tx, schedule, mesh, state_shardings),
                     lambda: (abstract_state, train.abstract_batch(config, mesh, config.batch_size)),
                     flops(config.batch_size)["train"] / chips))
    if "eval" in programs:
        b, k = config.eval.batch_size, config.eval.num_draws
        jobs.append(("eval", f"bits/dim eval step, batch {b}, {k} draw(s)",
                     lambda: evaluate.jit_eval_step(model, config, mesh, k),
                     lambda: (variables, train.abstract_batch(config, mesh, b, eval_batch=True), key),
                     k * flops(b)["forward"] / chips))
    if "sample" in programs:
        s = config.sample
        denoise = bool(s.denoise) and config.noise == "gaussian"
        labels = (jax.ShapeDtypeStruct((s.batch_size,), jnp.int32, sharding=replicated)
                  if config.model.num_classes else None)
        rows = s.batch_size * (2 if s.guidance > 0 else 1)  # guided and unguided branches
        jobs.append(("sample", f"sampler ({s.solver}, guidance {s.guidance}, denoise {denoise}), "
                     f"batch {s.batch_size}",
                     lambda: generate.jit_sample_step(model, config, mesh, denoise),
                     lambda: (variables, key, labels),
                     flops(rows)["sample"] / chips))
    log(f"mesh {' × '.join(f'{k}={v}' for k, v in mesh.shape.items())} over {chips} chips")
    with sharding.mesh_context(mesh):
        for name, description, build, args, model_flops in jobs:
            log(f"compiling {name}: {description} ...")
            program = compile_program(name, description, build(), args(), chip, model_flops, hlo_dir)
            if name == "train":
                program.warnings += replicated_params_warnings(abstract_state.params, mesh)
            if not program.fits:
                program.suggestion = suggest(program, config, topology, dict(mesh.shape))
            report["programs"].append(program.to_dict())
            log(format_program(program, chip))
    return report


def suggest(program: Program, config: Any, topology: Topology, mesh_shape: dict[str, int]) -> str:
    """The config or slice changes that should make ``program`` fit (activations scale with the per-chip batch)."""
    cap, need = program.capacity_bytes, program.need_bytes
    fixed = program.memory.get("argument", 0) if program.memory.get("temp") is not None else 0
    ratio = max((cap * 0.95 - fixed) / max(need - fixed, 1.0), 0.0)
    ideas = []
    if program.name == "train":
        ways = math.prod(mesh_shape[a] for a in ("dcn", "data", "fsdp"))
        batch = int(config.batch_size * ratio) // ways * ways
        if batch >= ways:
            ideas.append(f"--config.batch_size={batch} (≈{batch // ways} per chip)")
        chips = topology.chips_per_slice * max(2, 2 ** math.ceil(math.log2(max(1 / max(ratio, 1e-9), 1))))
        table = _SHAPES_3D if topology.chip.dims == 3 else _SHAPES_2D
        bigger = [c for c in table if c >= chips and config.batch_size % (c * topology.num_slices) == 0]
        if bigger:
            ideas.append(f"a {topology.chip.generation}-{bigger[0] * topology.chip.cores_per_chip} slice "
                         f"(fsdp over {bigger[0]} chips)")
        if not config.model.remat:
            ideas.append("--config.model.remat=True")
        elif config.model.get("remat_policy", "nothing") != "nothing":
            ideas.append("--config.model.remat_policy=nothing")
        if config.model.get("attention", "xla") == "xla":
            ideas.append("--config.model.attention=splash (no T×T attention matrices in HBM)")
    elif program.name == "eval":
        batch = int(config.eval.batch_size * ratio) // max(topology.num_chips, 1) * topology.num_chips
        ideas.append(f"--config.eval.batch_size={max(batch, topology.num_chips)}")
    else:
        batch = int(config.sample.batch_size * ratio) // max(topology.num_chips, 1) * topology.num_chips
        ideas.append(f"--config.sample.batch_size={max(batch, topology.num_chips)}")
    return "; or ".join(ideas)


# ----------------------------------------------------------------------- printing
def _gib(x: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if abs(x) >= size or unit == "KiB":
            return f"{x / size:.2f} {unit}"
    return f"{x:.0f} B"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.1f} µs"


def _si(x: float) -> str:
    for unit, size in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.3g}{unit}"
    return f"{x:.3g}"


def format_program(p: Program, chip: Chip) -> str:
    """A human-readable block for one program."""
    lines = [f"== {p.name}: {p.description}  (compiled in {p.compile_seconds:.0f} s)"]
    if p.error and not p.memory.get("argument"):
        lines.append(f"   DOES NOT FIT: the compiler refused it: needs {_gib(p.need_bytes)} of temporaries per "
                     f"chip, {_gib(p.capacity_bytes)} available ({p.error[:200]})")
    else:
        m = p.memory
        verdict = "fits" if p.fits else "DOES NOT FIT"
        lines.append(f"   HBM/chip     arguments {_gib(m['argument'])}, temporaries {_gib(m['temp'])}, "
                     f"outputs {_gib(m['output'])}, aliased {_gib(m['alias'])} -> {_gib(p.need_bytes)} of "
                     f"{_gib(p.capacity_bytes)} usable on {chip.device_kind}: headroom "
                     f"{_gib(p.capacity_bytes - p.need_bytes)} ({verdict})")
        h, r = p.hlo, p.roofline
        extra = ("" if abs(h["bf16_equivalent_flops"] - h["flops"]) < 1e-6 * max(h["flops"], 1)
                 else f" ({_si(h['bf16_equivalent_flops'])} bf16-pass equivalent)")
        lines.append(f"   per chip     {_si(h['flops'])} matmul FLOPs{extra}, {_si(h['bytes_accessed'])}B HBM "
                     f"traffic per step (loop-aware; XLA cost_analysis, loop bodies once: "
                     f"{_si(p.xla_cost.get('flops', 0))} FLOPs, {_si(p.xla_cost.get('bytes accessed', 0))}B)")
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        lines.append(f"   roofline     compute {_ms(r['compute_s'])}, HBM {_ms(r['hbm_s'])} -> "
                     f"{_ms(r['step_s'])} per step ({r['bound']}-bound); model FLOPs "
                     f"{_si(p.model_flops_per_chip)}/chip -> MFU {mfu} of the {chip.bf16_tflops:.0f} TFLOP/s "
                     f"bf16 peak (estimate, not a measurement)")
        coll = ", ".join(f"{k} {v['executed']:.0f}× {_si(v['bytes'])}B" for k, v in sorted(h["collectives"].items()))
        lines.append(f"   collectives  {coll or 'none'} per step (ICI time at full bandwidth, if not overlapped: "
                     f"{_ms(r['ici_s'])})")
        if h.get("opaque_kernels"):
            lines.append(f"   note         {h['opaque_kernels']} custom kernel(s) whose FLOPs are not visible (not counted)")
        if h.get("unknown_trip_counts"):
            lines.append(f"   note         {h['unknown_trip_counts']} loop(s) with an unknown trip count counted once")
    for w in p.warnings[:12]:
        lines.append(f"   warning      {w}")
    if len(p.warnings) > 12:
        lines.append(f"   warning      ... {len(p.warnings) - 12} more (see --json)")
    if p.suggestion:
        lines.append(f"   to fit       {p.suggestion}")
    return "\n".join(lines)


MARKDOWN_HEADER = ("| config | slice (chips) | mesh dcn×data×fsdp×tensor | program | HBM/chip: need of usable "
                   "(GiB) | fits | FLOPs/chip | HBM bytes/chip | roofline ms/step (bound) | MFU | collectives "
                   "per step |\n|---|---|---|---|---|---|---|---|---|---|---|")


def markdown_rows(report: dict[str, Any], config_name: str) -> list[str]:
    """One Markdown table row per program of a :func:`dry_run` report (see :data:`MARKDOWN_HEADER`)."""
    m = report["mesh"]
    mesh = f"{m['dcn']}×{m['data']}×{m['fsdp']}×{m['tensor']}"
    rows = []
    for p in report["programs"]:
        need = f"{p['need_bytes'] / GIB:.1f} of {p['capacity_bytes'] / GIB:.1f}"
        if not p["memory"].get("argument") and p["error"]:
            rows.append(f"| {config_name} | {report['slice']} ({report['chips']}) | {mesh} | {p['name']} | "
                        f"{need} (temporaries; compiler refused) | **no** | | | | | |")
            continue
        r, h = p["roofline"], p["hlo"]
        coll = ", ".join(f"{k} {_si(v['bytes'])}B" for k, v in sorted(h["collectives"].items()))
        mfu = f"{100 * r['mfu']:.0f}%" if r.get("mfu") is not None else ""
        rows.append(f"| {config_name} | {report['slice']} ({report['chips']}) | {mesh} | {p['name']} | {need} | "
                    f"{'yes' if p['fits'] else '**no**'} | {_si(h['bf16_equivalent_flops'])} | "
                    f"{_si(h['bytes_accessed'])} | {r['step_s'] * 1e3:.0f} ({'compute' if r['bound'] == 'compute' else 'HBM'}) | "
                    f"{mfu} | {coll} |")
    return rows


# ---------------------------------------------------------------------------- CLI
def main(argv: Sequence[str]) -> int:
    from absl import flags
    from ml_collections import config_flags

    FLAGS = flags.FLAGS
    del argv
    message = missing_libtpu_message()
    if message:
        print(f"tarflow_jax.aot: {message}", file=sys.stderr)
        return 2
    if FLAGS.config is None:
        print("tarflow_jax.aot: --config is required (e.g. --config=configs/imagenet64_cond.py)", file=sys.stderr)
        return 2
    try:
        topology = parse_topology(FLAGS.topology, FLAGS.num_slices)
    except ValueError as e:
        print(f"tarflow_jax.aot: {e}", file=sys.stderr)
        return 2
    prepare_environment()
    config = FLAGS.config
    print(f"dry run of {FLAGS['config'].serialize().split('=', 1)[-1]} on {topology.describe()}")
    try:
        report = dry_run(config, topology, FLAGS.programs, FLAGS.hlo_dir)
    except ValueError as e:
        print(f"tarflow_jax.aot: {e}", file=sys.stderr)
        return 2
    report["command"] = " ".join(["python -m tarflow_jax.aot"] + sys.argv[1:])
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
    if FLAGS.markdown:
        name = os.path.basename(config_flags.get_config_filename(FLAGS["config"]).split(":")[0]).removesuffix(".py")
        overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
        label = " ".join([f"`{name}`"] + [f"`{o[len('--config.'):]}`" for o in overrides])
        new_file = not os.path.exists(FLAGS.markdown)
        with open(FLAGS.markdown, "a") as f:
            if new_file:
                f.write(MARKDOWN_HEADER + "\n")
            f.write("\n".join(markdown_rows(report, label)) + "\n")
    failed = [p for p in report["programs"] if not p["fits"]]
    for p in failed:
        print(f"tarflow_jax.aot: {p['name']} does not fit on {topology.slice_name}: needs "
              f"{_gib(p['need_bytes'])} per chip, {_gib(p['capacity_bytes'])} available. "
              f"Try {p['suggestion']}.", file=sys.stderr)
    return 1 if failed else 0


def define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Experiment config, e.g. configs/imagenet64_cond.py[:smoke].",
                                    lock_config=True)
    flags.DEFINE_string("topology", "v5p-8", "TPU slice: v5e-16, v5p-32, v6e-64, v4-64, or a shape like v5p:2x4x4.")
    flags.DEFINE_integer("num_slices", 1, "Number of such slices (multislice: the mesh's dcn axis).")
    flags.DEFINE_list("programs", ["train", "eval", "sample"], "Which programs to compile.")
    flags.DEFINE_string("json", None, "Write the report as JSON to this file.")
    flags.DEFINE_string("markdown", None, "Append one Markdown table row per program to this file.")
    flags.DEFINE_string("hlo_dir", None, "Write each program's optimised HLO text into this folder.")


def run() -> None:
    from absl import app

    define_flags()
    app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
    run()
