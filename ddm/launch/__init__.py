"""Launching a run's jobs on SLURM or here, and keeping one job at a time in a job's folder.

- ``naming``: job names (``ddm:<run name>:expert`` / ``:router``) and the
  comment that ties a queued job to one run directory;
- ``slurm``: the few SLURM commands we call (``sbatch``, ``squeue``,
  ``scontrol``, ``scancel``), each a thin wrapper that parses its output;
- ``sbatch``: rendering the sbatch scripts of the expert array and the router
  job (and of a stage's parts and their merge) from an island's
  ``slurm:`` config block, and submitting them;
- ``stage_parts``, ``stage_jobs``: the stages that run in parts (prepare,
  embed, partition) or per cluster (encode), one row each, and those parts as
  jobs (``ddm submit submit.stage=<stage>``) and where each stands (``ddm status``);
- ``overrides``: which of the user's Hydra overrides travel to the jobs;
- ``local``, ``local_jobs``, ``slots``: the same jobs as processes on this machine;
- ``lock``: ``lock.json``, which a training (or encode) job holds in its folder
  while it writes there, so a second job on the same folder refuses;
- ``encode_job``: one cluster's encode: its lock, the folder it writes into,
  and the swap that puts the finished latents in place.

The stages ``ddm submit`` and ``ddm status`` (``ddm.stages.submit`` and
``ddm.stages.status``) are built from these. Importing them loads no torch.
"""
