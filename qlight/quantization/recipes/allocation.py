"""Bits per layer under a size budget: an exact multiple-choice knapsack over the layers' byte costs.

Each layer picks one bit-width; picking ``b`` for layer ``l`` costs ``cost[l][b]`` and does
``damage[l][b]`` (e.g. the KL divergence from the float model when that layer alone is quantized,
assumed additive across layers as in HAWQ-V3's ILP). The allocator minimises the summed damage with
the summed cost within the budget. It keeps, layer after layer, only the (cost, damage) pairs that
no other pair beats on both, which is exact and small for networks of tens of layers.
"""

from __future__ import annotations

from collections.abc import Mapping

from qlight.errors import QlightError

Plan = dict[str, int]


def allocate_bits(
    damage: Mapping[str, Mapping[int, float]], cost: Mapping[str, Mapping[int, int]], budget: int
) -> Plan:
    """The plan (layer -> bits) of least summed damage whose summed cost is at most ``budget``.

    Args:
        damage: per layer, the damage of each candidate bit-width.
        cost: per layer, the cost (bytes, or bits) of each candidate bit-width; same keys as ``damage``.
        budget: the most the plan may cost.

    Raises:
        QlightError: when even the cheapest choice of every layer costs more than ``budget``.
    """
    frontier: list[tuple[int, float, Plan]] = [(0, 0.0, {})]  # cost, damage, plan: sorted by cost
    for layer, options in damage.items():
        extended = sorted(
            (
                (spent + cost[layer][bits], harm + options[bits], {**plan, layer: bits})
                for spent, harm, plan in frontier
                for bits in options
                if spent + cost[layer][bits] <= budget
            ),
            key=lambda entry: entry[:2],
        )
        if not extended:
            cheapest = sum(min(layer_cost.values()) for layer_cost in cost.values())
            raise QlightError(f"a budget of {budget} cannot be met: the smallest feasible budget is {cheapest}")
        frontier = []
        for spent, harm, plan in extended:  # keep a pair only if it does less damage than every cheaper one
            if not frontier or harm < frontier[-1][1]:
                frontier.append((spent, harm, plan))
    return frontier[-1][2]
