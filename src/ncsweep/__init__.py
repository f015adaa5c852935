"""ncsweep: sweeps that test Neural Collapse claims, from the UFM to ResNets."""

import atexit
import gc

__version__ = "0.1.0"

# At exit the interpreter's last collections walk every object torch and Hydra made (1 s a
# process once torch._dynamo is loaded); frozen first, they are left to the operating system.
# Registered at import, before torch and W&B are, it runs after their exit handlers.
atexit.register(gc.freeze)
