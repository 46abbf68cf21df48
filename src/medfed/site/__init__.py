"""What runs at a hospital: the local training step, evaluation, and the site app."""
