"""An offline feature network for the Frechet Classifier Distance (FCD): a small CNN trained on our own data.

FID needs Inception-v3 weights that are not always at hand (and a data set whose classes Inception knows).
FCD is the same Frechet distance between Gaussian fits of features (Heusel et al. 2017, §3), but the features
are the 256-d penultimate layer of a classifier trained on the training shards (`python -m
data_prep.train_classifier`). FCDs are comparable only between evaluations made with the same weights file
(its sha256 is in every protocol and reference), and never with FIDs.

Weights file: safetensors, whose header metadata holds the format tag and the architecture, so a file
alone rebuilds the network; wrong file, format, keys, shapes or checksum raise ClassifierWeightsError.
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import asdict, dataclass

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from ict_scale.checkpoint import Storage
from ict_scale.errors import UserError
from ict_scale.ict import from_uint8

from .inception import exact_fp32
from .weights_file import read_verified

FORMAT = "ict_scale.classifier/1"
HOW_TO_MAKE = ("train one with `python -m data_prep.train_classifier --data <train manifest.json> "
               "--val <val manifest.json> --out classifier.safetensors`")


class ClassifierWeightsError(UserError, RuntimeError):
    """The classifier weights are missing, unreadable, of another format or architecture, or not the expected file."""


@dataclass(frozen=True)
class ClassifierSpec:
    """The architecture; stored in the weights file's metadata."""
    num_classes: int
    resolution: int                                   # training image side; other sizes are refused
    widths: tuple[int, ...] = (16, 32, 64, 128, 128)  # 3x3 conv stages (GroupNorm, ReLU)
    # Full resolution first: fine detail (noise, blur) stays visible; four halvings give a receptive field
    # of 33 pixels, so at 32x32 every pooled feature can see a whole shape.
    strides: tuple[int, ...] = (1, 2, 2, 2, 2)
    feature_dim: int = 256                            # 1x1 conv width = the pooled penultimate feature (FCD's features)
    groups: int = 8                                   # GroupNorm groups: batch-independent, so features are too

    @classmethod
    def from_json(cls, text: str, source: str) -> "ClassifierSpec":
        try:
            fields = json.loads(text)
            return cls(**{**fields, "widths": tuple(fields["widths"]), "strides": tuple(fields["strides"])})
        except (ValueError, TypeError, KeyError) as err:
            raise ClassifierWeightsError(f"{source}: metadata 'spec' is not a classifier architecture ({err})") from err


def _conv_block(c_in: int, c_out: int, kernel: int, stride: int, groups: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False),
                         nn.GroupNorm(min(groups, c_out), c_out), nn.ReLU(inplace=True))


class SmallClassifier(nn.Module):
    """uint8-range input -> (pooled features (N, feature_dim), logits (N, num_classes))."""

    def __init__(self, spec: ClassifierSpec):
        super().__init__()
        if len(spec.widths) != len(spec.strides) or not spec.widths:
            raise ValueError(f"widths {spec.widths} and strides {spec.strides} must be non-empty and of equal length")
        self.spec = spec
        blocks, c_in = [], 3
        for width, stride in zip(spec.widths, spec.strides):
            blocks.append(_conv_block(c_in, width, 3, stride, spec.groups))
            c_in = width
        blocks.append(_conv_block(c_in, spec.feature_dim, 1, 1, spec.groups))
        self.body = nn.Sequential(*blocks)
        self.head = nn.Linear(spec.feature_dim, spec.num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: float images in [-1, 1], (N, 3, R, R)."""
        features = self.body(x).mean(dim=(2, 3))  # global average pool, as Inception's pool3
        return features, self.head(features)


def classifier_bytes(model: SmallClassifier, extra: dict | None = None) -> bytes:
    """The safetensors file of `model`: weights (float32) and metadata (format, spec, `extra` as JSON)."""
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    spec = asdict(model.spec)
    meta = {"format": FORMAT, "spec": json.dumps(spec, sort_keys=True),
            "extra": json.dumps(extra or {}, sort_keys=True)}
    return save_safetensors(state, metadata=meta)


def save_classifier(url: str, model: SmallClassifier, extra: dict | None = None,
                    storage_options: dict | None = None) -> str:
    """Write the weights atomically (temporary name + rename locally, one PUT on object stores); return sha256."""
    data = classifier_bytes(model, extra)
    parent, _, name = url.rstrip("/").rpartition("/")
    storage = Storage(parent or ".", storage_options)
    storage.makedirs()
    storage.write_bytes(name, data)
    return hashlib.sha256(data).hexdigest()


def _header_metadata(data: bytes, source: str) -> dict:
    """The safetensors header's __metadata__: an 8-byte little-endian length, then that much JSON."""
    try:
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + length]) if 8 + length <= len(data) else None
    except (struct.error, ValueError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict):
        raise ClassifierWeightsError(f"{source}: not a safetensors file ({len(data):,} bytes); {HOW_TO_MAKE}")
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise ClassifierWeightsError(f"{source}: metadata format is {meta.get('format')!r}, expected {FORMAT!r} "
                                     f"(a classifier written by data_prep.train_classifier)")
    return meta


def _check_state(state: dict, model: nn.Module, source: str) -> None:
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ClassifierWeightsError(f"{source}: tensors do not match the architecture in its metadata: "
                                     f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, t in expected.items():
        if tuple(state[key].shape) != tuple(t.shape):
            raise ClassifierWeightsError(f"{source}: tensor {key!r} has shape {tuple(state[key].shape)}, "
                                         f"the architecture needs {tuple(t.shape)}")


def load_classifier(url: str, sha256: str | None = None, storage_options: dict | None = None):
    """(SmallClassifier on the CPU in eval mode, metadata 'extra' dict, sha256 of the file)."""
    data, digest = read_verified(url, sha256, storage_options, ClassifierWeightsError, "classifier weights",
                                 HOW_TO_MAKE)
    meta = _header_metadata(data, url)
    model = SmallClassifier(ClassifierSpec.from_json(meta.get("spec", ""), url))
    try:
        state = load_safetensors(data)
    except Exception as err:  # the library raises its own SafetensorError for truncated or corrupt bodies
        raise ClassifierWeightsError(f"{url}: unreadable safetensors body ({err})") from err
    _check_state(state, model, url)
    model.load_state_dict(state)
    return model.eval().requires_grad_(False), json.loads(meta.get("extra", "{}")), digest


class ClassifierFeatures:
    """Callable: uint8 RGB images (N, 3, R, R) -> float32 (N, feature_dim) penultimate features, exact fp32."""
    metric = "fcd"

    def __init__(self, network: SmallClassifier, device: torch.device, protocol: dict):
        self.network, self.device, self.protocol = network.to(device), device, protocol
        self.dim = network.spec.feature_dim

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        r = self.network.spec.resolution
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        if tuple(images.shape[2:]) != (r, r):
            raise ValueError(f"the classifier was trained on {r}x{r} images, got {tuple(images.shape[2:])}")
        # bf16 autocast from a surrounding training context must not reach the feature network.
        with exact_fp32(), torch.autocast(self.device.type, enabled=False):
            features, _ = self.network(from_uint8(images.to(self.device, non_blocking=True)))
        return features


def build_classifier_features(weights: str, device: torch.device | str = "cpu", *, sha256: str | None = None,
                              storage_options: dict | None = None) -> ClassifierFeatures:
    """The FCD feature network from a weights file (path or fsspec URL)."""
    if not weights:
        raise ClassifierWeightsError(f"eval.features=classifier needs eval.classifier_weights: {HOW_TO_MAKE}")
    device = torch.device(device)
    model, extra, digest = load_classifier(weights, sha256, storage_options)
    spec = model.spec
    protocol = {"extractor": "classifier", "metric": "fcd", "feature_dim": spec.feature_dim,
                "network": f"SmallClassifier widths {list(spec.widths)}, {spec.feature_dim}-d pooled features",
                "input": "uint8 RGB", "resolution": spec.resolution, "num_classes": spec.num_classes,
                "arithmetic": "float32, TF32 off, autocast off", "weights_sha256": digest, "weights": weights,
                "trained_on": extra.get("trained_on"),
                "held_out_accuracy": extra.get("held_out_accuracy"), "held_out_images": extra.get("held_out_images")}
    return ClassifierFeatures(model, device, protocol)
