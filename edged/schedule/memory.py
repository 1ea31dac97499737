"""Live activation memory of an op order, with the buffer reuse ONNX Runtime really does.

The model: when an op runs, its outputs are allocated (unless they share a buffer, see below);
an input's buffer is freed right after the last op that reads it (or any alias of it) has run.
The memory of a step is what is alive while the op runs: everything alive before it plus what it
allocates. The peak over the steps is what an inference needs.

Reuse rules (``MemoryRules``), measured with ``benchmarks/memory`` under the lean session
options of ``edged.schedule.session`` (arena, memory pattern and buffer pooling all off):

- aliasing: Reshape, Flatten, Squeeze, Unsqueeze and Identity return their input's buffer;
- in place: unary activations (Relu, Clip, Sigmoid, ...) and Softmax write over their input when
  they are its last reader and the sizes match; binary ops (Add, Mul, ...) never do; the
  optimizer's blocked-layout Conv accumulates a fused residual (its 4th input) in place;
- graph outputs always get a buffer of their own and stay alive to the end;
- graph inputs belong to the caller: held for the whole run, counted only when
  ``count_inputs`` is set (the measured per-inference heap does not include them);
- weights (initializers, Constant nodes) are not activations and are not counted;
- kernel scratch: ONNX Runtime's integer convolution allocates working buffers of its own while
  it runs (``kernel_scratch``); they count during that op only.
"""

from __future__ import annotations

import ctypes
import math
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from onnx import helper

from edged.errors import EdgedError
from edged.schedule.graph import Op, OpGraph

_ACTIVATIONS = ("Relu", "LeakyRelu", "Elu", "Selu", "Sigmoid", "HardSigmoid", "Tanh", "Softplus",
                "Softmax", "Clip")


@dataclass(frozen=True)
class MemoryRules:
    """Which ops share buffers. ``inplace`` maps an op key (``Op.key``) to the input slot whose
    buffer its first output may take over; ``alias`` ops return their first input's buffer."""

    inplace: Mapping[str, int] = field(default_factory=dict)
    alias: frozenset[str] = frozenset()
    count_inputs: bool = False


ORT_LEAN = MemoryRules(
    inplace={**{name: 0 for name in _ACTIVATIONS}, "nchwc:Conv": 3},
    alias=frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"}),
)
NO_REUSE = MemoryRules()


@dataclass(frozen=True)
class Step:
    """One op of an order: bytes alive while it runs and after it, and the largest tensor
    alive while it runs."""

    op: int
    name: str
    op_type: str
    during: int
    after: int
    largest: str
    largest_bytes: int


@dataclass(frozen=True)
class Simulation:
    """The live memory of every step of ``order``; ``peak`` bytes at step ``peak_step``."""

    order: tuple[int, ...]
    steps: tuple[Step, ...]

    @property
    def peak_step(self) -> int:
        return max(range(len(self.steps)), key=lambda k: self.steps[k].during)

    @property
    def peak(self) -> int:
        return self.steps[self.peak_step].during

    @property
    def peak_tensor(self) -> str:
        return self.steps[self.peak_step].largest


ARM64 = platform.machine().lower() in ("aarch64", "arm64")


def symmetric_conv(c_in: int, c_out: int, taps: int, depthwise: bool, arm64: bool = ARM64
                   ) -> bool:
    """Whether ONNX Runtime's integer convolution takes its direct "symmetric" kernel (int8
    weights of zero point 0 assumed) on this CPU family: ``MlasConvSymPackWSize`` in its MLAS
    library. Depthwise: the channel count a multiple of 16 (8 on ARM64). Dense: channel counts
    aligned to the kernel's blocks, and on ARM64 only for kernels larger than 1x1 over at
    least 64 input channels (ARM runs pointwise convolutions as a general integer GEMM)."""
    if depthwise:
        return c_in % (8 if arm64 else 16) == 0
    if arm64 and (taps <= 1 or c_in < 64):
        return False
    return c_in % (8 if arm64 else 4) == 0 and c_out % (16 if arm64 else 8) == 0 and c_out >= 16


def kernel_scratch(graph: OpGraph, op: Op, arm64: bool = ARM64) -> int:
    """Bytes a kernel allocates for itself while ``op`` runs and frees before it returns.

    Only ONNX Runtime's integer convolution (``QLinearConv``, its qlinearconv.cc) allocates in
    proportion to its tensors. Its symmetric kernel (``symmetric_conv``) builds an indirection
    buffer, one pointer per kernel tap and output pixel, for depthwise, strided, padded or
    larger than 1x1 kernels: 0.9 MB for a 3x3 depthwise at 112x112 on a 64-bit CPU. The general
    path adds an int32 accumulator per output value (requantized afterwards) and an im2col copy
    of the input for such kernels; channels-first tensors are transposed into scratch copies.
    """
    if op.op_type != "QLinearConv" or op.slot_inputs[0] is None:
        return 0
    node = graph.model.graph.node[op.node]
    weight = graph.weights.get(node.input[3])
    if weight is None or weight.ndim < 3:
        return 0  # weights computed at run time: no estimate
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    x, y = graph.tensors[op.slot_inputs[0]], graph.tensors[op.outputs[0]]
    channels_last = bool(attrs.get("channels_last", 0))
    pixels = math.prod(y.shape[1:-1] if channels_last else y.shape[2:])
    taps = math.prod(weight.shape[2:])
    groups = attrs.get("group", 1)
    depthwise = weight.shape[1] == 1 and groups == weight.shape[0] > 1
    direct = (taps == 1 and set(attrs.get("strides", [1])) == {1}
              and set(attrs.get("pads", [0])) == {0})  # reads its input as it is
    zero_point = graph.weights.get(node.input[5]) if len(node.input) > 5 else None
    symmetric = (weight.dtype == np.int8 and (zero_point is None or not np.any(zero_point))
                 and symmetric_conv(weight.shape[1] * groups, weight.shape[0], taps, depthwise,
                                    arm64))
    indirection = ctypes.sizeof(ctypes.c_void_p) * taps * pixels
    if symmetric:
        scratch = 0 if direct and not depthwise else indirection
    else:
        scratch = 4 * math.prod(y.shape)
        if depthwise:
            scratch += indirection
        elif not direct:
            scratch += math.prod(weight.shape[1:]) * pixels  # im2col, one byte per value
    if not channels_last:
        scratch += x.nbytes + y.nbytes
    return scratch


class MemoryModel:
    """Buffer groups and per-op costs of a graph under ``rules``; simulates orders.

    A buffer group is a tensor with the aliases made from it; it is freed when every op reading
    any member has run. ``step`` is the incremental core the order search also uses: given the
    set of ops already run (a bit mask) and the bytes alive, it returns the bytes alive during
    and after an op.
    """

    def __init__(self, graph: OpGraph, rules: MemoryRules = ORT_LEAN) -> None:
        self.graph = graph
        self.rules = rules
        outputs = set(graph.outputs)
        inputs = set(graph.inputs)
        self.root: dict[str, str] = {name: name for name in graph.inputs}
        for op in graph.ops:
            shared = op.slot_inputs[0] if op.slot_inputs and op.key in rules.alias else None
            for name in op.outputs:
                self.root[name] = self.root[shared] if shared and name not in outputs else name
        roots = sorted(set(self.root.values()), key=list(self.root).index)
        self.size = {g: 0 if g in inputs and not rules.count_inputs else graph.tensors[g].nbytes
                     for g in roots}
        # Caller-owned inputs and graph outputs are never freed during a run.
        self.pinned = {g for g in roots if g in inputs or g in outputs}
        self.readers = dict.fromkeys(roots, 0)
        for name, readers in graph.consumers.items():
            for i in readers:
                self.readers[self.root[name]] |= 1 << i
        self.alloc: list[int] = []
        self.new_groups: list[tuple[str, ...]] = []
        self.in_groups: list[tuple[str, ...]] = []
        self.inplace: list[str | None] = []
        self.scratch = [kernel_scratch(graph, op) for op in graph.ops]
        for op in graph.ops:
            new = tuple(name for name in op.outputs if self.root[name] == name)
            self.new_groups.append(new)
            self.alloc.append(sum(self.size[g] for g in new))
            self.in_groups.append(tuple(dict.fromkeys(self.root[t] for t in op.inputs)))
            self.inplace.append(self._inplace_group(op.key, op.slot_inputs, new))

    def _inplace_group(self, key: str, slots: tuple[str | None, ...],
                       new: tuple[str, ...]) -> str | None:
        """The input group whose buffer this op may write its first output into, if any."""
        slot = self.rules.inplace.get(key)
        if slot is None or slot >= len(slots) or slots[slot] is None or not new:
            return None
        group = self.root[slots[slot]]
        if group in self.pinned or new[0] in self.pinned or self.size[group] != self.size[new[0]]:
            return None
        return group

    def _freeable(self, group: str, done: int) -> bool:
        return group not in self.pinned and self.readers[group] & ~done == 0

    def step(self, i: int, done: int, live: int) -> tuple[int, int]:
        """(bytes alive during op ``i``, bytes alive after it), the ops in ``done`` having run
        with ``live`` bytes alive."""
        after_mask = done | (1 << i)
        during = live + self.alloc[i] + self.scratch[i]
        group = self.inplace[i]
        if group is not None and self._freeable(group, after_mask):
            during -= self.size[group]
        freed = sum(self.size[g] for g in self.in_groups[i] if self._freeable(g, after_mask))
        freed += sum(self.size[g] for g in self.new_groups[i] if self._freeable(g, after_mask))
        return during, live + self.alloc[i] - freed

    def initial_live(self) -> int:
        """Bytes alive before the first op: the graph inputs, if counted."""
        return sum(self.size[g] for g in self.graph.inputs)

    def simulate(self, order: Sequence[int]) -> Simulation:
        """Live memory of every step of ``order`` (a topological order of the graph's ops)."""
        if not self.graph.is_topological(order):
            raise EdgedError(f"{self.graph.source}: not a topological order of its ops")
        done, live = 0, self.initial_live()
        alive = set(self.graph.inputs)
        steps = []
        for i in order:
            during, after = self.step(i, done, live)
            done |= 1 << i
            group = self.inplace[i]
            if group is not None and self._freeable(group, done):
                alive.discard(group)
            alive.update(self.new_groups[i])
            largest = max(alive, key=lambda g: self.size[g], default="")
            op = self.graph.ops[i]
            steps.append(Step(i, op.name, op.op_type, during, after, largest,
                              self.size.get(largest, 0)))
            alive = {g for g in alive if not self._freeable(g, done)}
            live = after
        return Simulation(tuple(order), tuple(steps))
