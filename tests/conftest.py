import os
import sys
from pathlib import Path

import pytest

# Tests run single-threaded per process: multi-rank tests spawn several processes on 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

INTEGRATION = Path(__file__).resolve().parent / "integration"
INTEGRATION_TIMEOUT_S = 900  # torchrun trainings and resume runs: several launches per test on 2 cores


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every integration test ``slow`` with a longer timeout; skip ``gpu`` tests where CUDA is absent."""
    cuda = None
    for item in items:
        if INTEGRATION in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.slow)
            if not item.get_closest_marker("timeout"):
                item.add_marker(pytest.mark.timeout(INTEGRATION_TIMEOUT_S))
        if item.get_closest_marker("gpu"):
            if cuda is None:
                import torch

                cuda = torch.cuda.is_available()
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
