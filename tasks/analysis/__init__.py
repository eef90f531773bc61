"""Analyses a user runs on a run: where edits are lost (edits, edits_condition) and DeltaSpace alignment (deltaspace)."""
