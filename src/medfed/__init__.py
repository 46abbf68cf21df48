"""medfed: federated learning for medical imaging.

Kept light on purpose: importing ``medfed`` does not import torch or MONAI, so the CLI
starts fast and ``medfed validate`` never pays for a deep-learning import.
"""

__version__ = "0.1.0"

import logging as _logging

from medfed.core.text import install_log_filter as _install_log_filter

# every record of medfed's logger becomes one line of printable text, whatever a peer sent
_install_log_filter(_logging.getLogger("medfed"))
