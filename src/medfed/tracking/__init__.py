"""Tracking: the metrics store of a run (``metrics.jsonl``) and its HTML report.

``metrics.py`` writes and reads the records and derives the comparison table and learning
curves from them; ``report.py`` turns a run folder into one self-contained ``report.html``
and the same comparison into a terminal table.
"""
