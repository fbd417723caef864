"""Distillation, in one place: one student network that matches each sample's own expert.

- ``training``: the LightningModule that trains the student (``ddm distill`` runs it);
- ``student``: the distilled ``expert.pt`` as a plain PyTorch model, refused when its
  experts were retrained since (``ddm sample sample.model=distilled`` loads it);
- ``evaluation``: the evaluate stage's context for the student (``eval.model=distilled``).

The stage itself is ``ddm.stages.distill``.
"""
