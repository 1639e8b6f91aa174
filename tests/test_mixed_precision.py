import itertools
import random

import pytest

from qlight import QlightError
from qlight.quantization.bit_allocation import allocate_bits


def brute_force(damage, cost, budget):
    layers = list(damage)
    best = None
    for choice in itertools.product(*(damage[layer] for layer in layers)):
        spent = sum(cost[layer][bits] for layer, bits in zip(layers, choice, strict=True))
        harm = sum(damage[layer][bits] for layer, bits in zip(layers, choice, strict=True))
        if spent <= budget and (best is None or harm < best[0]):
            best = (harm, dict(zip(layers, choice, strict=True)))
    return best


@pytest.mark.parametrize("seed", range(50))
def test_the_allocation_equals_a_brute_force_search_on_a_four_layer_toy(seed):
    rng = random.Random(seed)
    bits = [2, 3, 4, 6, 8]
    damage = {f"layer{i}": {b: rng.random() * (9 - b) ** rng.uniform(1, 3) for b in bits} for i in range(4)}
    cost = {layer: {b: rng.randint(1, 50) * b for b in bits} for layer in damage}
    budget = rng.randint(sum(min(c.values()) for c in cost.values()), sum(max(c.values()) for c in cost.values()))
    plan = allocate_bits(damage, cost, budget)
    harm, _ = brute_force(damage, cost, budget)
    assert sum(cost[layer][b] for layer, b in plan.items()) <= budget
    assert sum(damage[layer][b] for layer, b in plan.items()) == pytest.approx(harm)


def test_a_budget_below_the_cheapest_plan_names_the_smallest_feasible_one():
    cost = {"a": {2: 10, 8: 40}, "b": {2: 5, 8: 20}}
    with pytest.raises(QlightError, match="smallest feasible budget is 15"):
        allocate_bits({"a": {2: 1.0, 8: 0.0}, "b": {2: 1.0, 8: 0.0}}, cost, 14)
