"""Training with Lightning: one expert on one partition, or the router over all partitions.

Only this package imports Lightning; the models, the flow path and the ensemble
stay plain PyTorch. Importing it checks the torch and Lightning versions first
(``ddm.train.requirements``): an older stack gets one message naming the versions
to install, instead of an import error deep inside the FSDP code.
"""

from ddm.train.requirements import check_training_stack

check_training_stack()
