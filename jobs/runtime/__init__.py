"""The Ray plumbing that several jobs share: connecting to Ray, per-node placement, the actor
pool fed one shard per task, progress lines. It imports no job (docs/ARCHITECTURE.md, "Code
layout")."""
