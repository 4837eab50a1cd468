import os
import sys

# Tests run single-threaded per process: multi-rank tests spawn several processes on 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
