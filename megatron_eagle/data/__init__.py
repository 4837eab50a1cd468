"""Data preparation and decoding: shards + metadata index, IAP tiling, ADS budgeting, prompts.

Modules are imported directly (``from megatron_eagle.data.tiling import choose_grid``);
this package file stays empty so importing one piece never pulls in the others.
"""
