"""ddm: Decentralized Diffusion Models.

Experts are flow-matching models each trained in isolation on one cluster of
the data; a router predicts which cluster a noisy sample came from, and the
ensemble ``sum_k p(k | x_t, t) v_k(x_t, t)`` (or its sparse top-k form) is the
sampling-time model. Library entry points::

    from ddm.flow import FlowPath
    from ddm.models import DiT, DiTClassifier
    from ddm.ensemble import Ensemble
    from ddm.sampling import sample
"""

__version__ = "0.1.0"
