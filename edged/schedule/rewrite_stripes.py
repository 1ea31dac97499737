"""Row stripes for the high-resolution first layers (the paper's first-layer trick extended to
patch-based inference): the blocks from the input to a cut are computed for a band of the cut
tensor's rows at a time, each band from the input rows it needs, then joined along the rows.

Each 3x3 conv reads a halo of rows around its band; the bands' row ranges are computed backward
from the cut exactly, including the asymmetric ("same", TF-style) padding of strided convs:
a band that reaches the image's edge keeps that side's zero padding, inner edges get none and
read real rows instead. Inside a band each block is split into channel groups as well.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx

from edged.schedule.blocks import Block, Builder, groups_for
from edged.schedule.graph import OpGraph
from edged.schedule.rewrite_split import emit_block


def stripe_chain(graph: OpGraph, blocks: list[Block], cut_height: int) -> list[Block]:
    """The blocks from the graph input through the first block whose output is at most
    ``cut_height`` rows, each feeding only the next one; empty if the graph does not start so."""
    chain: list[Block] = []
    source = graph.inputs[0] if len(graph.inputs) == 1 else None
    for block in blocks:
        if block.input != source:
            return []
        chain.append(block)
        if block.project.out_shape[2] <= cut_height:
            return chain if _private(graph, chain) else []
        source = block.output
    return []


def _private(graph: OpGraph, chain: list[Block]) -> bool:
    """Whether every tensor inside the chain is read only by the chain (the cut excepted)."""
    nodes = graph.model.graph.node
    inside = {k for block in chain for k in block.nodes}
    for block in chain[:-1]:
        for k in block.nodes:
            for name in nodes[k].output:
                if name in graph.outputs or any(
                        graph.ops[c].node not in inside for c in graph.consumers.get(name, [])):
                    return False
    return True


def _bands(height: int, count: int) -> list[tuple[int, int]]:
    cuts = [round(height * k / count) for k in range(count + 1)]
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b > a]


def stripe_region(builder: Builder, chain: list[Block], count: int,
                  pieces: Callable[[Block, int], int]) -> tuple[set[int], list[onnx.NodeProto]]:
    """The chain's nodes, and nodes computing its output in ``count`` row bands, each block of a
    band in ``pieces(block, rows of its expanded band)`` channel groups."""
    start = len(builder.nodes)
    builder.scope = "stripes"
    graph = builder.graph
    cut = chain[-1].output
    bands = []
    for a, b in _bands(graph.tensors[cut].shape[2], count):
        # Backward: the rows each block's input must hold for this band, and the pads.
        plan = []
        for block in reversed(chain):
            d_lo, d_hi, d_top, d_bottom = block.depthwise.rows_needed(a, b)
            e_lo, e_hi, e_top, e_bottom = block.expand.rows_needed(d_lo, d_hi)
            plan.append((block, (a, b), (e_lo, e_hi), ((e_top, e_bottom), (d_top, d_bottom)),
                         d_hi - d_lo))
            a, b = e_lo, e_hi
        x = builder.rows(graph.inputs[0], a, b)
        for block, (out_lo, out_hi), (in_lo, in_hi), pads, rows in reversed(plan):
            residual = None
            if block.add is not None and (out_lo, out_hi) != (in_lo, in_hi):
                residual = builder.rows(x, out_lo - in_lo, out_hi - in_lo)
            groups = groups_for(block.inner, pieces(block, rows))
            x = emit_block(builder, block, x, groups, pads=pads, residual=residual)
        bands.append(x)
    builder.node("Concat", bands, "bands", output=cut, axis=2)
    return {k for block in chain for k in block.nodes}, builder.nodes[start:]
