"""The cluster jobs and the CLI: ingest, refresh, train, inspect, bench, demo."""
