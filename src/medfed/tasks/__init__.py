"""Tasks: what a model predicts, its loss and its metrics."""
