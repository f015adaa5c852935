"""ncsweep's Hydra launchers: submitit with a preflight, a watcher and one-line errors."""
