"""The run's machinery: adaptation, data loading, optimizer, measurements, checkpoints, processes, suites."""
