"""Tracking: the metrics store of a run (``metrics.jsonl``) and its HTML report.

``metrics.py`` writes and reads the records and derives from them the comparison rows,
the spread across sites (worst, best, standard deviation, gap) and the learning curves;
``tables.py`` lays the comparison out as HTML and as a terminal table; ``report.py`` turns
a run folder into one self-contained ``report.html``; ``external.py`` sends the records to
TensorBoard and MLflow as they are written (the job's ``tracking`` section); ``compare.py``
sets several run folders side by side (``medfed compare``); ``contribution.py`` writes and
shows each site's contribution (``contribution.json``, the job's ``contribution`` section).
"""
