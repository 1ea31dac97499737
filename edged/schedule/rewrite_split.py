"""The bottleneck split (MobileNetV2 paper, section 5.1): a block as a sum of pieces.

``F(x) = A(N(B(x)))`` with ``B`` the expansion, ``N`` the depthwise conv and activations, ``A``
the projection, is computed as ``sum_i A_i(N(B_i(x)))`` over channel groups ``i`` of the inner
tensor, so only one group of the expanded tensor is ever alive. The expansion may be any
ungrouped conv: the stem conv with block 1 splits the same way (the paper's first-layer trick).
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx

from edged.schedule.blocks import Block, Builder, groups_for, replace_nodes
from edged.schedule.graph import OpGraph

Pads = tuple[int, int]


def emit_block(builder: Builder, block: Block, x: str, groups: list[tuple[int, int]],
               output: str | None = None, pads: tuple[Pads, Pads] | None = None,
               residual: str | None = None) -> str:
    """Nodes computing ``block`` on ``x`` one inner channel group at a time; ``pads``: the
    (top, bottom) padding of the expansion and the depthwise conv (row stripes), ``residual``:
    the tensor added back (default ``x``). Returns the output's name (``output`` if given)."""
    pad_e, pad_d = pads if pads is not None else (None, None)
    total = None
    last = len(groups) - 1
    for k, channels in enumerate(groups):
        inner = builder.conv(block.expand, x, channels, pads=pad_e)
        inner = builder.conv(block.depthwise, inner, channels, pads=pad_d)
        name = output if k == last and block.add is None else None
        # The bias is added once, by the first piece.
        piece = builder.conv(block.project, inner, in_channels=channels, bias=k == 0,
                             output=name if total is None else None)
        total = piece if total is None else builder.node("Add", [total, piece], "sum",
                                                         output=name)
    if block.add is not None:
        total = builder.node("Add", [total, residual or x], "residual", output=output)
    return total


def more_pieces(block: Block, t: int, at_least: int = 0) -> int | None:
    """The next group count to try after ``t`` for ``block``, at least ``at_least`` (``None``:
    none left; groups keep at least 8 channels)."""
    most = block.inner // 8
    if t >= most:
        return None
    return min(max(t + 1 if t < 4 else t * 3 // 2, at_least), most)


def pieces_for(block: Block, piece_bytes: int, rows: int | None = None) -> int:
    """How many channel groups keep one group of the expanded tensor (``rows`` of it) within
    ``piece_bytes``."""
    return max(1, -(-block.inner_bytes(rows) // max(piece_bytes, 1)))


def block_scope(block: Block) -> str:
    """The ``Builder.scope`` of a split block's nodes."""
    return f"block{block.index}"


def split_regions(builder: Builder, blocks: list[Block], pieces: Mapping[int, int]
                  ) -> list[tuple[set[int], list[onnx.NodeProto]]]:
    """For each block ``b`` of ``blocks`` with ``pieces[b.index] > 1``: its nodes and the nodes
    computing it in that many channel groups."""
    regions = []
    for block in blocks:
        t = pieces.get(block.index, 1)
        if t > 1:
            builder.scope = block_scope(block)
            start = len(builder.nodes)
            emit_block(builder, block, block.input, groups_for(block.inner, t), block.output)
            regions.append((set(block.nodes), builder.nodes[start:]))
    return regions


def split_blocks(graph: OpGraph, blocks: list[Block], pieces: Mapping[int, int]
                 ) -> onnx.ModelProto:
    """The model with each block ``b`` of ``blocks`` computed in ``pieces[b.index]`` groups
    (blocks with one piece, or absent, are left as they are)."""
    builder = Builder(graph, "split")
    return replace_nodes(graph, builder, split_regions(builder, blocks, pieces))
