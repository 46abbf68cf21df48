"""The server side: the round loop, update checks, checkpoints and the run folder."""
