"""The run (train.py) and the command-line tools beside it; record/, engine/ and sweeps/ below them."""
