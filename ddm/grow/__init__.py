"""Growing a finished run by new images, in one place (``ddm extend`` runs it).

- ``append``: the new shards appended to the run's ``data/``, the old ones untouched;
- ``clusters``: the clustering grown by the new samples (a new cluster, or the nearest ones),
  with a new ``clustering_id`` whose lineage keeps the untouched experts valid;
- ``measure``: are samples of the added classes those classes, and which expert drew them
  (``scripts/grow_experiment.py``).

Where a grown cluster's expert starts from its old weights is ``ddm.train.fine_tune``.
"""
