"""Which layers each rank holds."""

from __future__ import annotations


SEARCH_STEPS = 64  # halvings of the load bound: far below one byte of any model


def _pack(weights: list[int], capacities: list[float]) -> list[int] | None:
    """Layers per rank, each rank taking as many as fit its capacity and leaving one
    for each rank after it; None when the layers do not all fit, one a rank at least."""
    counts, start = [], 0
    for r, capacity in enumerate(capacities):
        end, load = start, 0
        last = len(weights) - (len(capacities) - r - 1)  # leaves one layer for each later rank
        while end < last and load + weights[end] <= capacity:
            load += weights[end]
            end += 1
        if end == start:
            return None
        counts.append(end - start)
        start = end
    return counts if start == len(weights) else None


def balanced_split(weights: list[int], shares: list[float]) -> list[int]:
    """Contiguous layers per rank, at least one each, weighed by their bytes (a dense first
    layer and mixture-of-experts layers differ): the largest load relative to a rank's
    share is least, and within that each rank takes its share of what is left, rounded
    up to a whole layer (so equal layers split as evenly as they can, the first ranks
    taking one more)."""
    low, high = 0.0, float(sum(weights)) / min(shares)
    for _ in range(SEARCH_STEPS):
        middle = (low + high) / 2
        if _pack(weights, [middle * share for share in shares]) is None:
            low = middle
        else:
            high = middle
    capacities = [high * share for share in shares]
    counts, start = [], 0
    for r in range(len(shares) - 1):
        fair = sum(weights[start:]) * shares[r] / sum(shares[r:])
        fits = [
            end for end in range(start + 1, len(weights) - (len(shares) - r - 1) + 1)
            if sum(weights[start:end]) <= capacities[r] and _pack(weights[end:], capacities[r + 1 :]) is not None
        ]
        above = [end for end in fits if sum(weights[start:end]) >= fair]
        end = min(above) if above else max(fits)
        counts.append(end - start)
        start = end
    return counts + [len(weights) - start]


def explicit_split(spec: str, num_layers: int, ranks: int, unit: str = "ranks") -> list[int]:
    counts = [int(p) for p in spec.split(",")]
    if len(counts) != ranks:
        raise ValueError(
            f"LAYER_SPLIT={spec!r} has {len(counts)} entries but the cluster has {ranks} {unit}"
        )
    if any(c < 1 for c in counts) or sum(counts) != num_layers:
        raise ValueError(
            f"LAYER_SPLIT={spec!r} must give each of the {unit} >= 1 layer and sum to the "
            f"model's {num_layers} layers (sums to {sum(counts)})"
        )
    return counts


def plan_split(spec: str, layer_bytes: list[int], memory: list[int], unit: str = "ranks") -> list[tuple[int, int]]:
    """Layer range [start, end) per rank (or per stage, `unit`) for LAYER_SPLIT `spec`:
    'even' (equal bytes of layers), 'memory' (bytes in proportion to each one's
    available memory) or '10,20'."""
    ranks, num_layers = len(memory), len(layer_bytes)
    if ranks > num_layers:
        raise ValueError(
            f"the cluster has {ranks} {unit} but the model has only {num_layers} layers; "
            f"use at most one of the {unit} per layer"
        )
    if spec == "even":
        counts = balanced_split(layer_bytes, [1.0] * ranks)
    elif spec == "memory":
        counts = balanced_split(layer_bytes, [max(m, 1) / max(memory) for m in memory])
    else:
        counts = explicit_split(spec, num_layers, ranks, unit)
    bounds = []
    start = 0
    for c in counts:
        bounds.append((start, start + c))
        start += c
    return bounds
