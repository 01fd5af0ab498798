"""Smoothing groups: the linears that share one λ. Linears reading the same tensor share the division x/λ,
and the call sites of one weight share the stored W·diag(λ), so both join one group (a union-find over the
linears, in graph order: the representative is the first member, whose name the group takes)."""

from __future__ import annotations

from typing import Iterable

import torch.fx

from svdq_compiler.fx_utils import is_linear


class _UnionFind:
    def __init__(self):
        self.parent: dict = {}

    def find(self, item):
        self.parent.setdefault(item, item)
        while self.parent[item] is not item:
            self.parent[item] = self.parent[self.parent[item]]
            item = self.parent[item]
        return item

    def union(self, a, b):
        root_a, root_b = self.find(a), self.find(b)
        if root_a is not root_b:
            self.parent[root_b] = root_a


def smoothing_groups(linears: list[torch.fx.Node], weight_sites: Iterable[list[torch.fx.Node]]
                     ) -> dict[torch.fx.Node, torch.fx.Node]:
    """Each linear's group representative. `weight_sites`: the nodes reading each weight (convolutions among
    them are never smoothed and are left out)."""
    groups = _UnionFind()
    first_reader: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in linears:
        groups.find(node)
        x = node.args[0]
        if x in first_reader:
            groups.union(first_reader[x], node)
        else:
            first_reader[x] = node
    for nodes in weight_sites:
        for other in nodes[1:]:
            if is_linear(other):
                groups.union(nodes[0], other)
    return {node: groups.find(node) for node in linears}
