"""``medfed dashboard RUN_DIR``: a live web page of a run, simulated or deployed.

It reads the run folder as it is written (metrics, run state, audit, log) and never
talks to sites:

* ``source.py``: which folder to read as the run goes on (a simulation's staging folder,
  then the run in place);
* ``readers.py``: following ``metrics.jsonl`` and ``run.log``, reading ``state.sqlite``
  read-only, parsing log lines into events;
* ``progress.py``: each site's state and the round progress, from those events;
* ``snapshot.py``: everything the page shows, as one JSON object, rebuilt on change;
* ``server.py``: the HTTP server (standard library), token on every route;
* ``page.py`` and ``static/``: the page, its script and the vendored charting library.
"""
