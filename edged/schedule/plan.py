"""Plans under a memory budget: which rewrites to apply, checked, recorded, written.

A ``Plan`` combines the rewrites: row stripes up to the stride-8 cut (``rewrite_stripes``),
the bottleneck split with t chosen per block (``rewrite_split``), and for segmentation labels
computed in row bands (``rewrite_segment``). ``plan_for_budget`` goes through ``STAGES`` from
the cheapest (no stripes) to the leanest; within a stage it splits the block holding the peak
into more groups until the computed per-inference peak fits, so only the blocks that must pay
for it do (fewer nodes: less latency and less session heap). The plan found is checked against
the original with ONNX Runtime on a real image before it is returned. The budget is the run
peak; the session heap a rewrite adds (about 6 KB per added node) is reported next to it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from edged.errors import EdgedError
from edged.fetch import atomic_file
from edged.schedule.blocks import Block, Builder, find_blocks, replace_nodes
from edged.schedule.graph import OpGraph, reordered_model
from edged.schedule.memory import MemoryModel, Simulation
from edged.schedule.order import OrderResult, best_order
from edged.schedule.rewrite_segment import label_region
from edged.schedule.rewrite_split import block_scope, more_pieces, pieces_for, split_regions
from edged.schedule.rewrite_stripes import stripe_chain, stripe_region
from edged.schedule.session import is_quantized, runtime_graph

NODE_BYTES = 6 * 1024  # session heap per added node, measured with benchmarks/memory
MAX_ABS_DIFF = 1e-4  # float outputs of a rewrite against the original
MIN_LABEL_AGREEMENT = 0.999  # label outputs: bilinear resize in bands is not bit-exact
_KB = 1024
LABEL_BANDS = 16  # DeepLabv3-513: 1.4 MB of resized logits per band


@dataclass(frozen=True)
class Plan:
    """Rewrites to apply: ``stripes`` row bands to the stride-8 cut (0: none), the blocks inside
    them split so one piece of an expanded band holds at most ``piece_bytes``; ``pieces``:
    ``(block index, groups)`` for the blocks outside the stripes; ``label_bands`` row bands for a
    segmentation model's resize + argmax (0: none)."""

    stripes: int = 0
    piece_bytes: int | None = None
    pieces: tuple[tuple[int, int], ...] = ()
    label_bands: int = 0

    def describe(self) -> str:
        """Human words for the plan."""
        parts = []
        if self.stripes:
            parts.append(f"{self.stripes} row stripes to stride 8 (pieces <= "
                         f"{(self.piece_bytes or 0) // _KB} KB)")
        if self.pieces:
            parts.append("split " + " ".join(f"b{b}/{t}" for b, t in self.pieces))
        if self.label_bands:
            parts.append(f"labels in {self.label_bands} bands")
        return ", ".join(parts) or "reorder only"


# The stages tried in turn, cheapest first: (stripes, piece bytes inside them). In each stage
# the block holding the peak is split into more groups until the budget is met or it can't be.
STAGES: tuple[tuple[int, int | None], ...] = (
    (0, None), (4, 512 * _KB), (4, 300 * _KB), (8, 300 * _KB), (8, 200 * _KB), (16, 100 * _KB))


@dataclass(frozen=True)
class Planned:
    """A plan applied: the rewritten graph, its order and its computed peak."""

    plan: Plan
    graph: OpGraph
    order: OrderResult
    original_nodes: int

    @property
    def peak(self) -> int:
        return self.order.peak

    @property
    def session_bytes(self) -> int:
        """Estimated session heap the rewrite adds (or saves)."""
        return (len(self.graph) - self.original_nodes) * NODE_BYTES

    def record(self, file_peak: int, check: dict) -> dict:
        """The ``edged.plan`` metadata."""
        rewrites = {"stripes": self.plan.stripes, "piece_bytes": self.plan.piece_bytes,
                    "pieces": dict(self.plan.pieces), "label_bands": self.plan.label_bands}
        return {"version": 2, "rules": "ort-lean", "rewrites": rewrites,
                "describe": self.plan.describe(), "method": self.order.method,
                "exact": self.order.exact, "peak_bytes": self.peak,
                "file_order_peak_bytes": file_peak, "lower_bound_bytes": self.order.lower_bound,
                "session_bytes_added": self.session_bytes, "check": check,
                "session": "lean (see edged.schedule.session)"}


def parse_size(text: str) -> int:
    """Bytes from ``2MB``, ``800KB``, ``1.5M``, ``300k`` or a plain number of bytes (KB and
    MB are 1000-based, KiB and MiB 1024-based)."""
    units = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 10**6, "mb": 10**6,
             "mib": 1 << 20, "g": 10**9, "gb": 10**9, "gib": 1 << 30}
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if match is None or match.group(2).lower() not in units or float(match.group(1)) <= 0:
        raise EdgedError(f"memory budget {text!r} is not a size (e.g. 2MB, 800KB, 1.5MiB)")
    return int(float(match.group(1)) * units[match.group(2).lower()])


def apply_plan(graph: OpGraph, plan: Plan, blocks: list[Block] | None = None
               ) -> onnx.ModelProto:
    """The model rewritten by ``plan`` (nodes in a valid order; ``graph`` is unchanged)."""
    builder = Builder(graph, "plan")
    blocks = find_blocks(graph) if blocks is None else blocks
    regions = []
    rest = blocks
    if plan.stripes:
        chain = _chain(graph, blocks)
        if chain:
            limit = plan.piece_bytes or 1 << 62
            regions.append(stripe_region(builder, chain, plan.stripes,
                                         lambda block, rows: pieces_for(block, limit, rows)))
            rest = [b for b in blocks if b.index > chain[-1].index]
    regions += split_regions(builder, rest, dict(plan.pieces))
    if plan.label_bands:
        builder.scope = "labels"
        region = label_region(builder, plan.label_bands)
        if region is not None:
            regions.append(region)
    return replace_nodes(graph, builder, regions) if regions else graph.model


def _chain(graph: OpGraph, blocks: list[Block]) -> list[Block]:
    height = graph.tensors[graph.inputs[0]].shape[2]
    return stripe_chain(graph, blocks, -(-height // 8))


def _peak_block(graph: OpGraph, blocks: list[Block], simulation: Simulation) -> Block | None:
    """The block the peak step belongs to (rewritten, by its scope, or as it was)."""
    name = simulation.steps[simulation.peak_step].name
    if name.startswith("plan/"):
        return {block_scope(b): b for b in blocks}.get(name.split("/")[1])
    nodes = graph.model.graph.node
    for block in blocks:
        if name in {nodes[k].name for k in block.nodes}:
            return block
    return None


def plan_for_budget(graph: OpGraph, budget: int, verify_image: str | Path | None = None,
                    time_limit: float = 2.0) -> tuple[Planned, onnx.ModelProto]:
    """The cheapest plan whose computed peak fits ``budget`` bytes, checked against the
    original, as a model ready to write (nodes in the best order, ``edged.plan`` set).

    Stages (``STAGES``) go from no stripes to many; within a stage the block holding the peak
    gets more groups (``more_pieces``) until the peak fits or lies where splitting can't help.
    """
    if is_quantized(graph):
        return _reorder_only(graph, budget, time_limit)
    file_peak = MemoryModel(graph).simulate(graph.file_order).peak
    blocks = find_blocks(graph)
    chain = _chain(graph, blocks)
    bands = LABEL_BANDS if label_region(Builder(graph, "probe"), 1) is not None else 0
    lowest: tuple[int, Plan] | None = None
    for stripes, piece_bytes in STAGES:
        if stripes and not chain:
            break
        striped = {b.index for b in chain} if stripes else set()
        pieces: dict[int, int] = {}
        plan = Plan(stripes, piece_bytes, (), 0)
        while True:
            model = apply_plan(graph, plan, blocks)
            rewritten = graph if model is graph.model else OpGraph.from_model(
                model, f"{graph.source} ({plan.describe()})")
            # The file order of a rewrite is good and quick to simulate; the order search
            # runs when the plan fits, or when splitting is done (branches: SSD's heads).
            simulation = MemoryModel(rewritten).simulate(rewritten.file_order)
            block = _peak_block(graph, blocks, simulation)
            if block is None and bands and not plan.label_bands:
                plan = Plan(stripes, piece_bytes, plan.pieces, bands)
                continue
            t = pieces.get(block.index, 1) if block is not None else 1
            # Far over the budget: jump ahead in proportion rather than one group at a time.
            more = None if block is None or block.index in striped else \
                more_pieces(block, t, t * simulation.peak // budget // 2)
            peak = simulation.peak
            if peak <= budget or more is None:
                order = best_order(rewritten, time_limit=time_limit)
                peak = order.peak
                if peak <= budget:
                    planned = Planned(plan, rewritten, order, len(graph))
                    return planned, finish(graph, planned, file_peak, verify_image)
            if lowest is None or peak < lowest[0]:
                lowest = (peak, plan)
            if more is None:
                break  # more stripes, smaller pieces: the next stage may still help
            pieces[block.index] = more
            plan = Plan(stripes, piece_bytes, tuple(sorted(pieces.items())), plan.label_bands)
    raise EdgedError(f"{graph.source}: no plan fits a budget of {budget / 1e6:.2f} MB; the "
                     f"lowest peak reached is {lowest[0] / 1e6:.2f} MB ({lowest[1].describe()})")


def _reorder_only(graph: OpGraph, budget: int, time_limit: float
                  ) -> tuple[Planned, onnx.ModelProto]:
    """The plan of a QDQ (int8) model: the best order of the graph ONNX Runtime runs, under the
    lean session. The rewrites are for float models: the pieces of a split projection must be
    added before requantization, which ONNX Runtime's integer kernels cannot do. The file keeps
    its QDQ form (portable); the daemon orders the optimized graph on its own CPU."""
    runtime = runtime_graph(graph)
    order = best_order(runtime, time_limit=time_limit)
    if order.peak > budget:
        raise EdgedError(f"{graph.source}: no plan fits a budget of {budget / 1e6:.2f} MB; an "
                         "int8 model is only reordered (the rewrites are for float models) and "
                         f"its lowest peak here is {order.peak / 1e6:.2f} MB")
    planned = Planned(Plan(), runtime, order, len(runtime))
    file_peak = MemoryModel(runtime).simulate(runtime.file_order).peak
    return planned, reordered_model(graph, graph.file_order, planned.record(file_peak, {}))


def verify_feed(graph: OpGraph, image: str | Path | None = None) -> dict[str, np.ndarray]:
    """The model's input made from a real photo (``image``, else scikit-image's astronaut),
    preprocessed as the daemon does it, with the model's ``edged.input`` mean and std (else
    normalized to [-1, 1])."""
    from edged.catalog import InputSpec
    from edged.preprocess import Preprocessor, verification_photo

    rgb, _name = verification_photo(image)
    name = graph.inputs[0]
    shape = graph.tensors[name].shape
    if len(shape) != 4 or shape[:2] != (1, 3):
        raise EdgedError(f"{graph.source}: input {name!r} is {list(shape)}, not [1, 3, H, W]")
    meta = {p.key: p.value for p in graph.model.metadata_props}
    spec = json.loads(meta.get("edged.input", "{}"))
    mean, std = spec.get("mean", [127.5] * 3), spec.get("std", [127.5] * 3)
    tensor, _roi = Preprocessor(InputSpec(shape[3], shape[2], tuple(mean), tuple(std), name))(
        np.ascontiguousarray(rgb[..., ::-1]))
    return {name: tensor.copy()}


def check_equivalent(original: onnx.ModelProto, rewritten: onnx.ModelProto,
                     feed: dict[str, np.ndarray], source: str) -> dict:
    """Run both with ONNX Runtime; float outputs must agree within ``MAX_ABS_DIFF``, integer
    (label) outputs on ``MIN_LABEL_AGREEMENT`` of their elements. Returns the figures."""
    from edged.schedule.session import lean_session_options, run_model

    expected = run_model(original, feed, lean_session_options(1))
    got = run_model(rewritten, feed, lean_session_options(1))
    figures = {}
    for name, want in expected.items():
        have = got[name]
        if np.issubdtype(want.dtype, np.floating):
            diff = float(np.abs(want - have).max())
            figures[name] = {"max_abs_diff": diff}
            if not diff <= MAX_ABS_DIFF:
                raise EdgedError(f"{source}: rewritten output {name!r} differs by {diff:.3g} "
                                 f"(more than {MAX_ABS_DIFF:g}); not written")
        else:
            agree = float(np.mean(want == have))
            figures[name] = {"agreement": agree}
            if agree < MIN_LABEL_AGREEMENT:
                raise EdgedError(f"{source}: rewritten output {name!r} agrees on {agree:.4%} of "
                                 f"its elements (less than {MIN_LABEL_AGREEMENT:.1%}); not "
                                 "written")
    return figures


def finish(graph: OpGraph, planned: Planned, file_peak: int,
           verify_image: str | Path | None = None) -> onnx.ModelProto:
    """The planned model in its best order with ``edged.plan`` recorded, after checking it
    against ``graph``'s model."""
    check = {}
    if planned.graph is not graph:
        feed = verify_feed(graph, verify_image)
        check = check_equivalent(graph.model, planned.graph.model, feed, graph.source)
    return reordered_model(planned.graph, planned.order.order, planned.record(file_peak, check))


def plan_file(path: Path, budget: int, verify_image: str | Path | None = None) -> str:
    """Rewrite the model file ``path`` in place with the plan for ``budget``; one line saying
    what was done (``edged convert --memory-budget``)."""
    from edged.schedule.graph import load_graph

    graph = load_graph(path)
    planned, model = plan_for_budget(graph, budget, verify_image)
    with atomic_file(Path(path)) as f:
        f.write(model.SerializeToString())
    before = MemoryModel(graph).simulate(graph.file_order).peak
    return (f"planned for {budget / 1e6:.2f} MB: {planned.plan.describe()}; per-inference "
            f"peak {before / 1e6:.2f} MB -> {planned.peak / 1e6:.2f} MB")
