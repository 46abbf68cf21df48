"""Tracking: the metrics store of a run (``metrics.jsonl``) and its HTML report.

``metrics.py`` writes and reads the records and derives from them the comparison rows,
the spread across sites (worst, best, standard deviation, gap) and the learning curves;
``tables.py`` lays the comparison out as HTML and as a terminal table; ``report.py`` turns
a run folder into one self-contained ``report.html``.
"""
