"""Loading a stage: data sources, pack building, the resumable loader, the TP batch broadcast."""
