"""The Ray layer: one module per pipeline stage, each a thin wrapper around core functions."""
