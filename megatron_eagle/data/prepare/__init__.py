"""Writing and checking prepared directories: prepare, reshard, verify, inspect, the synthetic dataset."""
