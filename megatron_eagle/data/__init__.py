"""Data: the on-disk shard format (:mod:`.shards`) and four packages around it.

- ``prepare/``: JSONL + media -> shards and index; reshard, verify, inspect; the synthetic demo dataset.
- ``media/``: images, video, IAP tiling, prompts, ADS budgeting (shared by prepare, planning and loading).
- ``packing/``: planner tables, packers, cost model, schedule, pack plans, curriculum.
- ``loading/``: a stage's plan -> model-ready micro-batches (sources, pack builder, TP broadcast).

Modules are imported directly (``from megatron_eagle.data.media.tiling import choose_grid``);
the package files stay empty so importing one piece never pulls in the others.
"""
