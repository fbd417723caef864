"""Networks: the DiT velocity model (one expert), the DiT router, and the interfaces they share."""

from ddm.models.dit import SIZES, DiT, DiTClassifier, count_params, parse_size
from ddm.models.velocity import Router, VelocityModel, guided, guided_velocity

__all__ = [
    "DiT",
    "DiTClassifier",
    "Router",
    "SIZES",
    "VelocityModel",
    "count_params",
    "guided",
    "guided_velocity",
    "parse_size",
]
