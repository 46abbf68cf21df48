"""medfed: federated learning for medical imaging.

Kept light on purpose: importing ``medfed`` does not import torch or MONAI, so the CLI
starts fast and ``medfed validate`` never pays for a deep-learning import.
"""

__version__ = "0.1.0"
