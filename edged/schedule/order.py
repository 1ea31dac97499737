"""A topological order of a graph's ops with the smallest peak of live memory.

``best_order`` tries, in turn:

1. a lower bound: while op ``v`` runs, its inputs and outputs are alive, and so is every tensor
   made before ``v`` (by an ancestor) and read after it (by a descendant), whatever the order;
2. the file's order and a greedy order (run first what frees the most memory); if one of them
   meets the bound it is optimal;
3. an exact search: for budgets rising from the bound, a depth-first search over the sets of
   ops already run (downward-closed sets), remembering the sets from which the rest cannot be
   run within the budget. An op that fits the budget and frees at least what it allocates is run
   at once (moving it earlier never raises a later step). The first budget that succeeds is the
   optimum. The search stops at a time limit and then keeps the best order found so far.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from edged.schedule.graph import OpGraph
from edged.schedule.memory import ORT_LEAN, MemoryModel, MemoryRules


@dataclass(frozen=True)
class OrderResult:
    """An order, its peak, how it was found, and whether it is proven minimal."""

    order: tuple[int, ...]
    peak: int
    method: str  # "file", "greedy" or "search"
    exact: bool
    lower_bound: int


def greedy_order(model: MemoryModel) -> list[int]:
    """Repeatedly run the ready op that leaves the least memory alive (ties: the lower step,
    then file order)."""
    graph = model.graph
    waiting = [len(p) for p in graph.preds]
    ready = {i for i, n in enumerate(waiting) if n == 0}
    done, live, order = 0, model.initial_live(), []
    while ready:
        costs = {i: model.step(i, done, live) for i in ready}
        i = min(ready, key=lambda j: (costs[j][1], costs[j][0], j))
        ready.remove(i)
        order.append(i)
        done |= 1 << i
        live = costs[i][1]
        for s in graph.succs[i]:
            waiting[s] -= 1
            if waiting[s] == 0:
                ready.add(s)
    return order


def lower_bound(model: MemoryModel) -> int:
    """Bytes alive during some step of every order (see the module docstring)."""
    graph = model.graph
    n = len(graph)
    ancestors = [0] * n
    for i in graph.file_order:
        for p in graph.preds[i]:
            ancestors[i] |= ancestors[p] | (1 << p)
    descendants = [0] * n
    for i in reversed(graph.file_order):
        for s in graph.succs[i]:
            descendants[i] |= descendants[s] | (1 << s)
    producer_of = {}
    for g in model.size:
        producer = graph.producer.get(g)
        producer_of[g] = -1 if producer is None else producer
    bound = 0
    for i in graph.file_order:
        alive = set(model.in_groups[i]) | set(model.new_groups[i])
        if model.inplace[i] is not None:
            alive.discard(model.inplace[i])
        for g, producer in producer_of.items():
            made_before = producer < 0 or ancestors[i] >> producer & 1
            if made_before and (g in model.pinned or model.readers[g] & descendants[i]):
                alive.add(g)
        bound = max(bound, sum(model.size[g] for g in alive))
    return bound


class _Search:
    """Depth-first search for an order whose every step fits ``budget`` bytes."""

    def __init__(self, model: MemoryModel, deadline: float) -> None:
        self.model = model
        self.deadline = deadline
        self.full = (1 << len(model.graph)) - 1
        self.pred_mask = [sum(1 << p for p in preds) for preds in model.graph.preds]
        self.failed: set[int] = set()
        self.overshoot = 0  # the smallest step above the budget met: the next budget to try
        self.timed_out = False

    def run(self, budget: int) -> list[int] | None:
        self.failed.clear()
        self.overshoot = 0
        ready = frozenset(i for i, m in enumerate(self.pred_mask) if m == 0)
        order: list[int] = []
        return order if self._dfs(0, self.model.initial_live(), ready, budget, order) else None

    def _dfs(self, done: int, live: int, ready: frozenset[int], budget: int,
             order: list[int]) -> bool:
        if done == self.full:
            return True
        if done in self.failed or self.timed_out:
            return False
        if time.monotonic() > self.deadline:
            self.timed_out = True
            return False
        options = []
        for i in ready:
            during, after = self.model.step(i, done, live)
            if during > budget:
                if not self.overshoot or during < self.overshoot:
                    self.overshoot = during
                continue
            if after <= live:  # frees at least what it allocates: no reason to wait
                options = [(after, i)]
                break
            options.append((after, i))
        for after, i in sorted(options):
            mask = done | (1 << i)
            new_ready = ready - {i} | {s for s in self.model.graph.succs[i]
                                       if self.pred_mask[s] & ~mask == 0}
            order.append(i)
            if self._dfs(mask, after, frozenset(new_ready), budget, order):
                return True
            order.pop()
        self.failed.add(done)
        return False


def best_order(graph: OpGraph, rules: MemoryRules = ORT_LEAN, time_limit: float = 10.0
               ) -> OrderResult:
    """The minimum-peak order of ``graph`` (proven when ``exact``), searching at most
    ``time_limit`` seconds; never worse than the file's order."""
    start = time.monotonic()
    model = MemoryModel(graph, rules)
    bound = lower_bound(model)
    candidates = [("file", graph.file_order), ("greedy", greedy_order(model))]
    peaks = [(model.simulate(order).peak, k) for k, (_, order) in enumerate(candidates)]
    peak, k = min(peaks)
    method, order = candidates[k]
    exact = peak <= bound
    budget = bound
    search = _Search(model, start + time_limit)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 4 * len(graph) + 1000))
    try:
        while not exact and budget < peak:
            found = search.run(budget)
            if search.timed_out:
                break
            if found is not None:
                order, peak, method = found, model.simulate(found).peak, "search"
                exact = True
            elif not search.overshoot or search.overshoot >= peak:
                exact = True  # nothing fits below the order already in hand
            else:
                budget = search.overshoot
    finally:
        sys.setrecursionlimit(limit)
    return OrderResult(tuple(order), peak, method, exact, bound)
