"""What a run writes: the typed results record, its file, the W&B log and the record builder."""
