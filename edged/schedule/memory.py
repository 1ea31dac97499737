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
- weights (initializers, Constant nodes) are not activations and are not counted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from edged.errors import EdgedError
from edged.schedule.graph import OpGraph

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
        during = live + self.alloc[i]
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
