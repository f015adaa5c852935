"""Seeds trained as one batched model: a sweep's jobs that differ only in ``seed``.

``trainer.ensemble=true`` makes the launchers hand such jobs over together. Each member is
built exactly as its solo run (``build_run`` after its own seed), so it starts from the solo
run's weights; its batches come from its own ``torch.Generator().manual_seed(seed)``, drawn
as a solo run draws them. The members' tensors are then stacked on a leading member
dimension and trained by batched matmuls (``torch.baddbmm``) with one elementwise optimiser
over the stacked tensors, which is each member's own optimiser state side by side. Batch norm
keeps per-member running statistics, updated from each member's own batch. The loop is the
Trainer's (``Trainer.run`` with a :class:`StackedStepper`).

Supported: ``arch=mlp`` (``arch.freeze=none``) and ``arch=ufm`` (single start), either head,
``loss=ce|mse``, ``optim=sgd|adam`` (AdamW too). Eval points, checkpoints, summaries and W&B
runs are each member's own, in the solo format: a member's checkpoint resumes as a solo run
and back. Members whose checkpoints stand at different points, or whose data differ, are
trained one after another instead.
"""


from ncsweep.ensemble.members import Member, build_members, prepare, run_group
from ncsweep.ensemble.stacked import Stacked, member_losses
from ncsweep.ensemble.stepper import StackedStepper
from ncsweep.ensemble.support import check_supported

__all__ = ["Member", "Stacked", "StackedStepper", "build_members", "check_supported",
           "member_losses", "prepare", "run_group"]
