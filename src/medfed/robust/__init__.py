"""Robustness to faulty or malicious sites: robust aggregation rules (rules.py), attack
simulation for studies (attacks.py) and their job settings (settings.py).

Nothing is imported here: config.py reads settings.py, and rules.py needs the algorithms,
which need config.py.
"""
