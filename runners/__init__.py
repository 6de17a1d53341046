"""Runners: the training loop, its measurements, result files, logging and pretraining."""
