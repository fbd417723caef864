"""Launching a run's jobs on SLURM.

- ``naming``: job names (``ddm:<run name>:expert`` / ``:router``) and the
  comment that ties a queued job to one run directory;
- ``slurm``: the few SLURM commands we call (``sbatch``, ``squeue``,
  ``scontrol``, ``scancel``), each a thin wrapper that parses its output;
- ``sbatch``: rendering the sbatch scripts of the expert array and the router
  job from an island's ``slurm:`` config block;
- ``overrides``: which of the user's Hydra overrides travel to the jobs.

The stages ``ddm submit`` and ``ddm status`` (``ddm.stages.submit`` and
``ddm.stages.status``) are built from these. Nothing here imports torch.
"""
