"""What the evaluate stage (``ddm.stages.evaluate``) reads from a run directory and its config.

- ``heldout``: writes ``evaluation/heldout/``, the held-out real images, as ``eval.heldout`` says;
- ``clusters``: the cluster of a held-out or training image (assignments, or the run's clustering rule);
- ``generated``: the generated images of a strategy, from ``samples/`` or sampled now;
- ``feature_spaces``: the classifier feature net trained on the run's data, and the Inception file;
- ``context``: ``EvaluationContext``, the loaded run that every part of the evaluation shares.

The metrics themselves are plain functions in ``ddm.eval``.
"""

from __future__ import annotations

from pathlib import Path

from ddm.artifacts import RunDir


def evaluation_dir(rd: RunDir) -> Path:
    """``<run>/evaluation/``: everything the evaluate stage writes."""
    return rd.evaluation
