"""Text conditioning: captions from the data, and the encoder that turns them into a ``TextCondition``."""

from ddm.text.captions import Captions
from ddm.text.encoder import OpenClipTextEncoder, text_width

__all__ = ["Captions", "OpenClipTextEncoder", "text_width"]
