"""ncsweep: sweeps that test Neural Collapse claims, from the UFM to ResNets."""

__version__ = "0.1.0"
