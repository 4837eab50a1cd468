#!/usr/bin/env python
"""Training throughput of our megatron-core step against the HF baseline (``benchmarks/train/``).

    python benchmarks/train_throughput.py --help
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0]).resolve() == REPO / "benchmarks":
    sys.path[0] = str(REPO)  # run as a script: import the benchmarks package, not its folder's modules
elif str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.train.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
