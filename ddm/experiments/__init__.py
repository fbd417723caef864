"""Experiments built from the stages: grids of runs whose results go into one table.

- ``paper_table``: the small-scale paper table (monolith vs DDM at equal training
  FLOPs, over K, partitions, training budgets and routing strategies); a package
  of small modules, listed in its docstring, with ``run(cfg)`` as its entry point.
  Command line: ``python scripts/paper_table.py experiment=paper_small``.
"""
