"""A researcher's own networks, for medfed's ``model: {import: "mynets.nets:build"}``.

Not installed: put ``examples/own-model`` on ``PYTHONPATH`` (see the README beside it), or
make it a package of your own and ``pip install`` it at every site of a deployment.
"""
