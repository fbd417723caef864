"""Networks: the DiT velocity model (one expert) and the DiT router."""
from ddm.models.dit import DiT, DiTClassifier, SIZES, count_params, guided, parse_size

__all__ = ["DiT", "DiTClassifier", "SIZES", "count_params", "guided", "parse_size"]
