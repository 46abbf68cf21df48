"""medfed: federated learning for medical imaging.

Kept light on purpose: importing ``medfed`` does not import torch or MONAI, so the CLI
starts fast and ``medfed validate`` never pays for a deep-learning import.

The Python API (:mod:`medfed.api`), loaded on first use: ``medfed.run``,
``medfed.load_job``, ``medfed.validate`` and ``medfed.Result``.
"""

__version__ = "0.1.0"

import logging as _logging

from medfed.core.text import install_log_filter as _install_log_filter

# every record of medfed's logger becomes one line of printable text, whatever a peer sent
_install_log_filter(_logging.getLogger("medfed"))

_API = ("run", "load_job", "validate", "Result")


def __getattr__(name: str):
    """The API's names, imported when first used (``import medfed`` stays light)."""
    if name in _API:
        import importlib

        return getattr(importlib.import_module("medfed.api"), name)
    raise AttributeError(f"module 'medfed' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
