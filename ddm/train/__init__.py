"""Training with Lightning: one expert on one partition, or the router over all partitions.

Only this package imports Lightning; the models, the flow path and the ensemble
stay plain PyTorch.
"""
