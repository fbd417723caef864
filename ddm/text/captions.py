"""Where a sample's caption comes from: its own ``txt``, or a template over its class name.

Labelled sets without captions (Fashion-MNIST, digits, an ImageNet folder)
become text data through a template, ``"a photo of a {class}"``: ``{class}``
is replaced by the class name the data's manifest records for the label.
"""

from __future__ import annotations

from ddm.errors import BadInput

PLACEHOLDER = "{class}"


class Captions:
    """``captions(txt, label) -> str``: the sample's caption, else the template filled with its class name."""

    def __init__(self, template: str | None = None, class_names: list[str] | None = None):
        if template is not None and PLACEHOLDER not in template:
            raise BadInput(f"text.caption_template={template!r} has no {PLACEHOLDER} for the class name")
        if template is not None and not class_names:
            raise BadInput(
                f"text.caption_template={template!r} needs class names, but the data has none: "
                f"give the samples captions (<name>.txt beside an image, txt in webdataset shards)"
            )
        self.template, self.class_names = template, list(class_names or [])

    def __call__(self, caption: str | None, label: int, key: str = "") -> str:
        if caption:
            return caption
        if self.template is None:
            raise BadInput(
                f"sample {key or '?'} has no caption: give every sample one, or set "
                f'text.caption_template="a photo of a {PLACEHOLDER}" to make them from the class names'
            )
        if not 0 <= label < len(self.class_names):
            raise BadInput(f"sample {key or '?'} has label {label}, which has no class name for the caption template")
        return self.template.replace(PLACEHOLDER, self.class_names[label])

    def of_labels(self, labels) -> list[str]:
        """Captions for class labels (sampling a labelled set's classes as prompts)."""
        return [self(None, int(y)) for y in labels]
