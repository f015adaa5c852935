"""ncsweep's Hydra sweeper: Hydra's basic sweeper with cheap checks of value-only siblings."""
