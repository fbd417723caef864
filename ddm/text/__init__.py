"""Text conditioning: captions from the data, and the encoder that turns them into a ``TextCondition``."""

from ddm.text.encoder import OpenClipTextEncoder

__all__ = ["OpenClipTextEncoder"]
