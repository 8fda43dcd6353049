"""Loop-aware costs and collectives of a compiled XLA program, read from its HLO text.

XLA's ``compiled.cost_analysis()`` counts the body of every ``while`` loop once. A model
with scanned layers (``scan_layers=True``) runs its layer body ``layers_per_block`` times
per flow block, and a sampler runs its token step ``T - 1`` times, so for those programs
the compiler's FLOP and byte counts are low by up to the trip count. :func:`analyze`
walks the optimised HLO module (``compiled.as_text()``) instead and weights every
computation by how often it runs:

* **trip counts** come from each loop's condition computation (``compare(i, N),
  direction=LT`` on the tuple's induction variable, as XLA emits for ``lax.scan`` and
  ``fori_loop``); a loop whose count cannot be read counts once and is listed in
  ``unknown_trip_counts``; both branches of a ``conditional`` count (an upper bound);
* **FLOPs** are those of matrix units only: every ``dot`` and ``convolution`` (TPU
  compilers turn most dots into convolutions), inside fusions too, counted with XLA's own
  convolution rule (``2 · batch · out_features · in_features/groups · valid
  input/kernel position pairs``), plus the splash-attention Pallas kernels, whose matmuls
  XLA cannot see (:meth:`_Module.kernel_flops`); elementwise work, and matmuls XLA lowers
  to vector reductions (a batch of one row per chip), are not counted;
* **MXU passes**: a float32 matmul at ``precision=HIGHEST`` runs as 6 bfloat16 passes on a
  TPU's matrix unit and ``HIGH`` as 3 (``DEFAULT`` converts the operands to bfloat16: 1);
  ``bf16_equivalent_flops`` weights each matmul by its passes, for a roofline against the
  chip's bfloat16 peak;
* **HBM bytes** are counted per top-level instruction (fusions as a whole): operands read
  plus results written, with slices and in-place updates (``dynamic-slice``,
  ``dynamic-update-slice``, also as a fusion's root or parameter use) counted at the size
  of the slice, as XLA's cost model does;
* **collectives** by kind, with how many run per step and their bytes per chip: the
  gathered result of an all-gather, the full input of a reduce-scatter (on TPU an
  ``all-reduce-scatter`` fusion) and of an all-reduce, the input of an all-to-all and of a
  collective-permute.

These are estimates of an ideal execution from the program text; they are not measured.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any

DTYPE_BYTES = {
    "pred": 1, "s2": 0.25, "u2": 0.25, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
    "s32": 4, "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8,
    "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1, "f8e4m3fnuz": 1,
    "f8e5m2fnuz": 1, "f8e3m4": 1, "f8e4m3": 1, "f8e8m0fnu": 1, "f4e2m1fn": 0.5, "token": 0,
}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(DTYPE_BYTES, key=len, reverse=True)) + r")\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMMENT = re.compile(r"/\*.*?\*/")
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# Instructions that move no data of their own (their callees are counted separately).
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional",
         "call", "after-all", "partition-id", "replica-id", "opt-barrier", "copy-done",
         "all-gather-done", "all-reduce-done", "collective-permute-done", "async-done",
         "async-update", "send-done", "recv-done", "add-dependency", "domain", "iota"}
PASSES = {"highest": 6, "high": 3}


@dataclasses.dataclass
class Instruction:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    attrs: str
    root: bool


@dataclasses.dataclass
class Stats:
    """Per-step totals of one program (per chip for an SPMD program)."""

    flops: float = 0.0
    bf16_equivalent_flops: float = 0.0
    bytes_accessed: float = 0.0
    collectives: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    unknown_trip_counts: int = 0
    opaque_kernels: int = 0  # custom kernels whose FLOPs are unknown (not counted)
    loops: list[tuple[str, int]] = dataclasses.field(default_factory=list)

    def add(self, other: "Stats", times: float = 1.0) -> None:
        self.flops += times * other.flops
        self.bf16_equivalent_flops += times * other.bf16_equivalent_flops
        self.bytes_accessed += times * other.bytes_accessed
        for kind, entry in other.collectives.items():
            mine = self.collectives.setdefault(kind, {"ops": 0, "executed": 0.0, "bytes": 0.0})
            mine["ops"] += entry["ops"]
            mine["executed"] += times * entry["executed"]
            mine["bytes"] += times * entry["bytes"]
        self.unknown_trip_counts += other.unknown_trip_counts
        self.opaque_kernels += other.opaque_kernels

    def to_dict(self) -> dict[str, Any]:
        return {"flops": self.flops, "bf16_equivalent_flops": self.bf16_equivalent_flops,
                "bytes_accessed": self.bytes_accessed,
                "collectives": {k: dict(v) for k, v in sorted(self.collectives.items())},
                "unknown_trip_counts": self.unknown_trip_counts, "opaque_kernels": self.opaque_kernels}


def shape_bytes(shape: str) -> float:
    """Bytes of every array in an HLO shape string (tuples summed; layouts ignored)."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape):
        total += DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def shape_dims(shape: str) -> tuple[str, list[int]]:
    """``(dtype, dims)`` of the first array in an HLO shape string."""
    match = _ARRAY.search(shape)
    if not match:
        return "", []
    return match.group(1), [int(d) for d in match.group(2).split(",") if d]


def _balanced(text: str, start: int) -> int:
    """Index just past the parenthesis group opening at ``text[start]``."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


def _split_top(text: str) -> list[str]:
    parts, depth, last = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[last:i])
            last = i + 1
    parts.append(text[last:])
    return [p.strip() for p in parts if p.strip()]


def parse_instruction(line: str) -> Instruction | None:
    """One HLO instruction line, or ``None`` for anything else."""
    match = _INSTR.match(_COMMENT.sub("", line))
    if not match:
        return None
    name, rest = match.groups()
    rest = rest.strip()
    if rest.startswith("("):
        end = _balanced(rest, 0)
        shape, rest = rest[:end], rest[end:].strip()
    else:
        shape, _, rest = rest.partition(" ")
    op = re.match(r"([\w\-]+)\(", rest)
    if not op:
        return None
    end = _balanced(rest, op.end() - 1)
    operands = []
    for part in _split_top(rest[op.end():end - 1]):
        names = re.findall(r"%([\w.\-]+)", part)
        operands.append(names[-1] if names else part.split()[-1])
    return Instruction(name, shape, op.group(1), operands, rest[end:], line.lstrip().startswith("ROOT"))


def parse_module(text: str) -> tuple[dict[str, list[Instruction]], str]:
    """Computations (name → instructions) of an HLO module's text, and the entry's name.

    An instruction may span several lines (e.g. a custom call's backend config); lines that
    do not start a new instruction continue the previous one, and only a line holding a
    lone ``}`` closes a computation.
    """
    computations: dict[str, list[Instruction]] = {}
    entry, current, pending = "", None, []

    def flush():
        if current is not None and pending:
            instr = parse_instruction(" ".join(pending))
            if instr is not None:
                computations[current].append(instr)
        pending.clear()

    for line in text.splitlines():
        if current is None:
            if line and not line[0].isspace() and line.rstrip().endswith("{") and "->" in line:
                head = line.split("(")[0].split()
                current = head[-1].lstrip("%")
                computations[current] = []
                if head[0] == "ENTRY":
                    entry = current
            continue
        if line.strip() == "}":
            flush()
            current = None
        elif _INSTR.match(line):
            flush()
            pending.append(line)
        elif pending:
            pending.append(line.strip())
    return computations, entry


def _attr(attrs: str, key: str) -> str | None:
    match = re.search(rf"\b{key}=(\{{[^}}]*\}}|[^,\s]+)", attrs)
    return match.group(1) if match else None


def _callees(attrs: str, key: str) -> list[str]:
    value = _attr(attrs, key)
    if value is None:
        return []
    return re.findall(r"%?([\w.\-]+)", value.strip("{}"))


class _Module:
    def __init__(self, text: str, splash_block: Any = None):
        self.splash_block = splash_block or (lambda tokens: min(tokens, 512))
        self.computations, self.entry = parse_module(text)
        self.shapes = {i.name: i.shape for instrs in self.computations.values() for i in instrs}
        self.by_name = {i.name: i for instrs in self.computations.values() for i in instrs}
        self.trip_counts: list[tuple[str, int]] = []

    def _local(self, computation: str) -> dict[str, Instruction]:
        return {i.name: i for i in self.computations.get(computation, [])}

    @staticmethod
    def _int_constant(instr: Instruction | None) -> int | None:
        if instr is not None and instr.opcode == "constant" and instr.operands \
                and re.fullmatch(r"-?\d+", instr.operands[0]):
            return int(instr.operands[0])
        return None

    def _tuple_index(self, instr: Instruction | None, local: dict[str, Instruction]) -> int | None:
        """The tuple index ``instr`` reads from the loop parameter (through copies/converts)."""
        while instr is not None and instr.opcode in ("copy", "convert", "bitcast"):
            instr = local.get(instr.operands[0])
        if instr is not None and instr.opcode == "get-tuple-element":
            match = re.search(r"index=(\d+)", instr.attrs)
            return int(match.group(1)) if match else None
        return None

    def trip_count(self, loop: Instruction, computation: str) -> int | None:
        """Iterations of a ``while``: ``ceil((N - start) / step)`` for ``ROOT compare(i, N), direction=LT``.

        ``i`` is a tuple element of the loop state; ``start`` is its value in the loop's
        initial tuple (0 when not a constant) and ``step`` the constant the body adds to it
        (XLA's windowed matmul loops step by 2, for instance).
        """
        cond = (_callees(loop.attrs, "condition") or [""])[0]
        body = (_callees(loop.attrs, "body") or [""])[0]
        local = self._local(cond)
        index = limit = None
        for instr in self.computations.get(cond, []):
            if instr.root and instr.opcode == "compare" and len(instr.operands) == 2:
                a, b = (local.get(o) for o in instr.operands)
                if "direction=LT" in instr.attrs:
                    index, limit = self._tuple_index(a, local), self._int_constant(b)
                elif "direction=GT" in instr.attrs:
                    index, limit = self._tuple_index(b, local), self._int_constant(a)
        if index is None or limit is None:
            return None
        start, step = 0, 1
        outer = self._local(computation)
        init = outer.get(loop.operands[0]) if loop.operands else None
        if init is not None and init.opcode == "tuple" and index < len(init.operands):
            start = self._int_constant(outer.get(init.operands[index])) or 0
        body_local = self._local(body)
        roots = [i for i in self.computations.get(body, []) if i.root and i.opcode == "tuple"]
        if roots and index < len(roots[0].operands):
            update = body_local.get(roots[0].operands[index])
            if update is not None and update.opcode == "add":
                steps = [self._int_constant(body_local.get(o)) for o in update.operands]
                steps = [c for c in steps if c]
                step = steps[0] if steps else 1
        return max(0, -(-(limit - start) // step)) if step > 0 else None

    # ------------------------------------------------------------------ flops
    def matmul_flops(self, instr: Instruction) -> float:
        out_dtype, out_dims = shape_dims(instr.shape)
        if len(instr.operands) < 2 or instr.operands[0] not in self.shapes:
            return 0.0
        lhs_dtype, lhs = shape_dims(self.shapes[instr.operands[0]])
        if instr.opcode == "dot":
            contracting = _attr(instr.attrs, "lhs_contracting_dims") or "{}"
            size = math.prod(lhs[int(d)] for d in re.findall(r"\d+", contracting))
            return 2.0 * math.prod(out_dims) * size
        labels = _attr(instr.attrs, "dim_labels")
        rhs_shape = self.shapes.get(instr.operands[1])
        if labels is None or rhs_shape is None:
            return 0.0
        _, rhs = shape_dims(rhs_shape)
        lhs_l, rest = labels.split("_", 1)
        rhs_l, out_l = rest.split("->")
        window = _attr(instr.attrs, "window") or "{}"
        fields = dict(re.findall(r"(\w+)=([^\s}]+)", window))
        spatial = [c for c in lhs_l if c.isdigit()]
        n = len(spatial)

        def per_dim(key, default):
            if key not in fields:
                return [default] * n
            return [int(v) if "_" not in v else v for v in fields[key].split("x")]

        strides, lhs_dil, rhs_dil = per_dim("stride", 1), per_dim("lhs_dilate", 1), per_dim("rhs_dilate", 1)
        pads = [tuple(int(x) for x in p.split("_")) for p in fields["pad"].split("x")] \
            if "pad" in fields else [(0, 0)] * n
        valid = 1
        for k in range(n):
            digit = str(k)
            in_size = lhs[lhs_l.index(digit)]
            kernel = rhs[rhs_l.index(digit)]
            out_size = out_dims[out_l.index(digit)]
            dilated = (in_size - 1) * lhs_dil[k] + 1
            count = 0
            for o in range(out_size):
                base = o * strides[k] - pads[k][0]
                for w in range(kernel):
                    p = base + w * rhs_dil[k]
                    if 0 <= p < dilated and p % lhs_dil[k] == 0:
                        count += 1
            valid *= count
        batch = lhs[lhs_l.index("b")]
        in_features = lhs[lhs_l.index("f")]
        out_features = rhs[rhs_l.index("o")]
        groups = int(_attr(instr.attrs, "feature_group_count") or 1)
        batch_groups = int(_attr(instr.attrs, "batch_group_count") or 1)
        return 2.0 * (in_features // groups) * out_features * (batch // batch_groups) * valid

    def passes(self, instr: Instruction) -> int:
        dtypes = {shape_dims(self.shapes.get(o, ""))[0] for o in instr.operands[:2]}
        precision = (_attr(instr.attrs, "operand_precision") or "").lower()
        if dtypes & {"f32", "f64"}:
            for name, count in PASSES.items():
                if name in precision.split(",")[0]:
                    return count
        return 1

    def kernel_flops(self, instr: Instruction) -> float:
        """FLOPs of a Pallas splash-attention kernel (XLA sees only an opaque custom call).

        Reads ``(B, H, T, hd)`` from the kernel's first 4-D operand layout; counts its
        ``T×T×hd`` matmuls (forward 2, dq 3, dkv 4) over the causal blocks it visits:
        ``(n + 1) / 2n`` of them for ``n = T / block`` blocks per side.
        """
        match = re.match(r"splash_mha_(fwd|dq|dkv)", instr.name)
        if not match:
            return 0.0
        start = instr.attrs.find("operand_layout_constraints=")
        layouts = instr.attrs[start:].split("=", 2)[1] if start >= 0 else ""
        for dtype, dims in _ARRAY.findall(layouts):
            shape = [int(d) for d in dims.split(",") if d]
            if len(shape) == 4:
                batch, heads, tokens, head_dim = shape
                blocks = max(tokens // self.splash_block(tokens), 1)
                matmuls = {"fwd": 2, "dq": 3, "dkv": 4}[match.group(1)]
                return 2.0 * matmuls * batch * heads * tokens * tokens * head_dim * (blocks + 1) / (2 * blocks)
        return 0.0

    # ------------------------------------------------------------------ bytes
    def _param_read_bytes(self, fused: str, index: int, full: float) -> float:
        """Bytes a fusion reads of its ``index``-th operand: slices only, in-place buffers none."""
        instrs = self.computations.get(fused, [])
        params = [i for i in instrs if i.opcode == "parameter" and i.operands == [str(index)]]
        if not params:
            return full
        name = params[0].name
        users = [i for i in instrs if name in i.operands]
        if users and all(u.opcode == "dynamic-slice" and u.operands[0] == name for u in users):
            return sum(shape_bytes(u.shape) for u in users)
        if users and all(u.opcode == "dynamic-update-slice" and u.operands[0] == name for u in users):
            return 0.0
        return full

    def _fusion_write_bytes(self, fused: str, full: float) -> float:
        instrs = self.computations.get(fused, [])
        roots = [i for i in instrs if i.root]
        if not roots:
            return full
        root = roots[0]
        parts = [self.by_name.get(o) for o in root.operands] if root.opcode == "tuple" else [root]
        total = 0.0
        for part in parts:
            if part is None:
                continue
            if part.opcode == "dynamic-update-slice" and len(part.operands) > 1:
                total += shape_bytes(self.shapes.get(part.operands[1], ""))
            else:
                total += shape_bytes(part.shape)
        return total

    def instruction_bytes(self, instr: Instruction) -> float:
        op = instr.opcode
        if op in _FREE:
            return 0.0
        out = shape_bytes(instr.shape)
        if op == "dynamic-slice":
            return 2 * out
        if op == "dynamic-update-slice":
            return 2 * shape_bytes(self.shapes.get(instr.operands[1], "")) if len(instr.operands) > 1 else out
        if op == "fusion":
            fused = (_callees(instr.attrs, "calls") or [""])[0]
            reads = sum(self._param_read_bytes(fused, k, shape_bytes(self.shapes.get(o, "")))
                        for k, o in enumerate(instr.operands))
            return reads + self._fusion_write_bytes(fused, out)
        return out + sum(shape_bytes(self.shapes.get(o, "")) for o in instr.operands)

    # ------------------------------------------------------------ collectives
    def collective(self, instr: Instruction) -> tuple[str, float] | None:
        op = instr.opcode.removesuffix("-start")
        if op == "fusion":
            fused = (_callees(instr.attrs, "calls") or [""])[0]
            if fused.startswith("all-reduce-scatter") or "reduce-scatter" in fused:
                return "reduce-scatter", sum(shape_bytes(self.shapes.get(o, "")) for o in instr.operands)
            return None
        if op not in COLLECTIVES:
            return None
        if instr.opcode.endswith("-start") and op == "all-gather":
            # the result of an async start is (operands, outputs): count the gathered outputs
            parts = re.findall(r"[a-z0-9]+\[[0-9,]*\]", instr.shape)
            return op, sum(shape_bytes(p) for p in parts[len(parts) // 2:])
        if op == "all-gather":
            return op, shape_bytes(instr.shape)
        return op, sum(shape_bytes(self.shapes.get(o, "")) for o in instr.operands)

    # -------------------------------------------------------------- traversal
    @functools.lru_cache(maxsize=None)
    def stats(self, computation: str, fused: bool = False) -> Stats:
        result = Stats()
        for instr in self.computations.get(computation, []):
            if instr.opcode in ("dot", "convolution"):
                flops = self.matmul_flops(instr)
                result.flops += flops
                result.bf16_equivalent_flops += flops * self.passes(instr)
            elif instr.opcode == "custom-call":
                flops = self.kernel_flops(instr)
                result.flops += flops
                result.bf16_equivalent_flops += flops
                if not flops and "tpu_custom_call" in instr.attrs:
                    result.opaque_kernels += 1
            if not fused:
                result.bytes_accessed += self.instruction_bytes(instr)
                coll = self.collective(instr)
                if coll is not None:
                    entry = result.collectives.setdefault(coll[0], {"ops": 0, "executed": 0.0, "bytes": 0.0})
                    entry["ops"] += 1
                    entry["executed"] += 1
                    entry["bytes"] += coll[1]
            if instr.opcode == "while":
                body = (_callees(instr.attrs, "body") or [""])[0]
                trips = self.trip_count(instr, computation)
                if trips is None:
                    result.unknown_trip_counts += 1
                    trips = 1
                self.trip_counts.append((instr.name, trips))
                result.add(self.stats(body), trips)
            elif instr.opcode == "conditional":
                for branch in (_callees(instr.attrs, "branch_computations")
                               + _callees(instr.attrs, "true_computation")
                               + _callees(instr.attrs, "false_computation")):
                    result.add(self.stats(branch))
            elif instr.opcode == "call" or instr.opcode.startswith("async"):
                for callee in _callees(instr.attrs, "calls") + _callees(instr.attrs, "to_apply"):
                    result.add(self.stats(callee, fused))
            elif instr.opcode == "fusion":
                for callee in _callees(instr.attrs, "calls"):
                    inner = self.stats(callee, True)
                    result.flops += inner.flops
                    result.bf16_equivalent_flops += inner.bf16_equivalent_flops
        return result


def analyze(hlo_text: str, splash_block: Any = None) -> Stats:
    """Loop-aware per-step costs and collectives of one compiled program's HLO text.

    ``splash_block(T)`` gives the splash-attention block size used for ``T`` tokens (for
    the kernel's FLOPs; default ``min(T, 512)``).
    """
    module = _Module(hlo_text, splash_block)
    if not module.entry:
        raise ValueError("no ENTRY computation in the HLO text")
    stats = module.stats(module.entry)
    result = Stats()
    result.add(stats)
    result.loops = sorted(set(module.trip_counts))
    return result
