"""The parallel layout: TP, PP, CP (and its variant), sequence parallelism."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from megatron_eagle.config.errors import ConfigError

CP_VARIANTS = ("ring", "allgather", "ulysses", "hybrid")


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    sp: bool = False
    cp_variant: Literal["ring", "allgather", "ulysses", "hybrid"] = "allgather"
    # hybrid only: Ulysses degree U inside a node (cp = U x ring); 0 = gcd(heads per TP rank, cp), capped per node
    cp_ulysses: int = 0

    @property
    def model_parallel(self) -> int:
        """tp * pp * cp: the processes that hold one replica."""
        return self.tp * self.pp * self.cp


def ulysses_degree(parallel: ParallelConfig, num_heads: int, local_gpus: int = 1 << 30) -> int:
    """Ulysses degree U of the configured CP variant (cp = U x ring); raises ConfigError naming the fix.

    ``local_gpus``: GPUs per node, the cap of the automatic hybrid degree (Ulysses stays inside a node).
    """
    cp, v = parallel.cp, parallel.cp_variant
    heads = num_heads // parallel.tp  # query heads per TP rank
    if v not in CP_VARIANTS:
        raise ConfigError("parallel.cp_variant", f"unknown {v!r}", f"use one of {list(CP_VARIANTS)}")
    if parallel.cp_ulysses and v != "hybrid":
        raise ConfigError("parallel.cp_ulysses", f"only used by cp_variant=hybrid (got {v})",
                          "remove it or set parallel.cp_variant=hybrid")
    if v in ("ring", "allgather"):
        return 1
    if v == "ulysses":
        if cp > heads:
            raise ConfigError("parallel.cp_variant", f"ulysses splits heads over cp={cp} ranks but each TP rank has "
                              f"{heads} query heads", "use cp_variant=hybrid (ulysses x ring), ring or allgather")
        return cp
    u = parallel.cp_ulysses
    if u == 0:  # Eagle 2.5's rule: gcd(heads, cp), kept inside a node
        cap = max(1, local_gpus // parallel.tp)
        u = max(d for d in range(1, math.gcd(heads, cp) + 1) if cp % d == 0 and heads % d == 0 and d <= cap)
    if u < 1 or cp % u:
        raise ConfigError("parallel.cp_ulysses", f"{u} does not divide cp={cp}",
                          f"use one of {[d for d in range(1, cp + 1) if cp % d == 0]}")
    if u > heads:
        raise ConfigError("parallel.cp_ulysses", f"{u} > {heads} query heads per TP rank",
                          f"use at most {heads} (a divisor of cp={cp})")
    return u
