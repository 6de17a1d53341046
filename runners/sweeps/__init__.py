"""Sweeps as config files: the Hydra sweeper and the checks it runs before submitting."""
