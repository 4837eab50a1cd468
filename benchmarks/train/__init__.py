"""The training-throughput benchmark (``python benchmarks/train_throughput.py``): :mod:`.runner`
(command line, per-layout launches, measuring loop), :mod:`.variants`, :mod:`.ours` and
:mod:`.baselines` (the two sides), :mod:`.packs`, :mod:`.timing` and :mod:`.report`."""
