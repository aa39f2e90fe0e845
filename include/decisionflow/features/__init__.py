"""Features: Feast over the gold Delta tables (offline store, training sets, materialization windows)."""
