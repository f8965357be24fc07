"""Which layers each rank holds."""

from __future__ import annotations


def even_split(num_layers: int, ranks: int) -> list[int]:
    """Equal shares; the first ranks take one extra layer each when it doesn't divide."""
    base, extra = divmod(num_layers, ranks)
    return [base + (1 if r < extra else 0) for r in range(ranks)]


def memory_split(num_layers: int, memory: list[int]) -> list[int]:
    """Shares proportional to each rank's available memory, at least one layer each."""
    ranks = len(memory)
    spare = num_layers - ranks
    total = sum(memory) or ranks
    exact = [spare * m / total for m in memory]
    counts = [1 + int(x) for x in exact]
    # Largest remainders take the layers rounding left over.
    order = sorted(range(ranks), key=lambda r: exact[r] - int(exact[r]), reverse=True)
    for r in order[: num_layers - sum(counts)]:
        counts[r] += 1
    return counts


def explicit_split(spec: str, num_layers: int, ranks: int) -> list[int]:
    counts = [int(p) for p in spec.split(",")]
    if len(counts) != ranks:
        raise ValueError(
            f"LAYER_SPLIT={spec!r} has {len(counts)} entries but the cluster has {ranks} ranks"
        )
    if any(c < 1 for c in counts) or sum(counts) != num_layers:
        raise ValueError(
            f"LAYER_SPLIT={spec!r} must give each rank >= 1 layer and sum to the "
            f"model's {num_layers} layers (sums to {sum(counts)})"
        )
    return counts


def plan_split(spec: str, num_layers: int, memory: list[int]) -> list[tuple[int, int]]:
    """Layer range [start, end) per rank for LAYER_SPLIT `spec` ('even', 'memory' or '10,20')."""
    ranks = len(memory)
    if ranks > num_layers:
        raise ValueError(
            f"the cluster has {ranks} ranks but the model has only {num_layers} layers; "
            "use at most one rank per layer"
        )
    if spec == "even":
        counts = even_split(num_layers, ranks)
    elif spec == "memory":
        counts = memory_split(num_layers, memory)
    else:
        counts = explicit_split(spec, num_layers, ranks)
    bounds = []
    start = 0
    for c in counts:
        bounds.append((start, start + c))
        start += c
    return bounds
