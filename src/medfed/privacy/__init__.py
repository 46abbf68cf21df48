"""What leaves a hospital: differential privacy, secure aggregation and compression, each a
filter on the update path (see base.py)."""
