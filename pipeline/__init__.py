"""Data side of salient: ingest, manifest, demo set, crops, mask strategies, the loader."""
