"""Checkpoint converters: one module per source format."""
