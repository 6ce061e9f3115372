"""The FID feature network: Inception-v3 (TF graph of 2015-12-05), pool3 2048-d features, as torch-fidelity ships it.

We use torch-fidelity's FeatureExtractorInceptionV3, a port of the TF graph checked against TF outputs:
uint8 input, TF1-compatible bilinear resize to 299x299 (align_corners=False, no antialias), (x - 128) / 128,
TF's average-pool padding and max-pool quirks. Our code only decides where the weights come from, checks
them, and runs the network in exact fp32 (TF32 off, autocast off). Nothing is ever downloaded: the
extractor is always constructed from bytes we read and verified ourselves.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import io
import os
import sys

import torch
from torch import nn

from ict_scale.errors import UserError

from .weights_file import read_verified

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
# sha256 of that file (95,628,359 bytes). torch-fidelity ships the same bytes as
# weights-inception-2015-12-05-6726825d.pth (its v0.2.0 release); the name carries the digest's first 8 digits.
WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
WEIGHTS_ENV = "ICT_INCEPTION_WEIGHTS"
WEIGHTS_SOURCES = ("the 'fid_weights' release of pytorch-fid (github.com/mseitzer/pytorch-fid), or torch-fidelity's "
                   "v0.2.0 release asset weights-inception-2015-12-05-6726825d.pth (same bytes)")


class InceptionWeightsError(UserError, RuntimeError):
    """The Inception weights are missing, unreadable or not the expected file."""


def _how_to_get() -> str:
    return (f"get {WEIGHTS_FILE} (sha256 {WEIGHTS_SHA256}) from {WEIGHTS_SOURCES}, put it anywhere "
            f"readable (a local path or an fsspec URL such as s3://bucket/{WEIGHTS_FILE}) and set "
            f"eval.inception_weights=<path> or the environment variable {WEIGHTS_ENV}=<path>")


def resolve_weights_url(configured: str | None = "") -> str:
    """The weights location: the configured value, else $ICT_INCEPTION_WEIGHTS; an error says what to get."""
    url = configured or os.environ.get(WEIGHTS_ENV, "")
    if not url:
        raise InceptionWeightsError(f"no Inception weights configured: {_how_to_get()}")
    return url


def read_weights(url: str, sha256: str | None = WEIGHTS_SHA256, storage_options: dict | None = None) -> bytes:
    """The weight file's bytes, after checking their sha256 (`sha256=None` skips the check)."""
    return read_verified(url, sha256, storage_options, InceptionWeightsError, "Inception weights", _how_to_get())[0]


def fidelity_inception_class() -> type:
    """torch-fidelity's FeatureExtractorInceptionV3 class, importable without torchvision.

    The package's __init__ also imports its CLIP/VGG/dataset helpers, which need torchvision; the
    Inception module needs only torch. Where the full import fails for that reason we import the module
    under an uninitialised package object, then drop that object so a later `import torch_fidelity`
    still runs (and reports) the real __init__.
    """
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        return FeatureExtractorInceptionV3
    except ModuleNotFoundError as err:
        if err.name == "torch_fidelity":
            raise ImportError("FID needs torch-fidelity (pip install --no-deps torch-fidelity==0.4.0; it "
                              "runs without torchvision)") from err
    except RuntimeError:  # a torchvision that does not match torch fails at import with a RuntimeError
        pass
    package = "torch_fidelity"
    spec = importlib.util.find_spec(package)
    saved = sys.modules.get(package)
    sys.modules[package] = importlib.util.module_from_spec(spec)  # __path__ set, __init__ not run
    try:
        module = importlib.import_module(f"{package}.feature_extractor_inceptionv3")
    finally:
        if saved is None:
            del sys.modules[package]
        else:
            sys.modules[package] = saved
    return module.FeatureExtractorInceptionV3


def fidelity_version() -> str:
    from importlib.metadata import version
    return version("torch-fidelity")


def random_inception_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights for the real architecture (for tests and timing only, never for reported FIDs).

    Convs get He-normal weights and BatchNorm the identity, so activations keep unit scale through the
    network and the features are informative enough to compare two implementations.
    """
    blocks = sys.modules[fidelity_inception_class().__module__]
    conv = blocks.BasicConv2d
    layout = nn.Module()  # the attribute names of FeatureExtractorInceptionV3, in its order
    for name, layer in [
        ("Conv2d_1a_3x3", conv(3, 32, kernel_size=3, stride=2)), ("Conv2d_2a_3x3", conv(32, 32, kernel_size=3)),
        ("Conv2d_2b_3x3", conv(32, 64, kernel_size=3, padding=1)), ("Conv2d_3b_1x1", conv(64, 80, kernel_size=1)),
        ("Conv2d_4a_3x3", conv(80, 192, kernel_size=3)), ("Mixed_5b", blocks.InceptionA(192, pool_features=32)),
        ("Mixed_5c", blocks.InceptionA(256, pool_features=64)), ("Mixed_5d", blocks.InceptionA(288, pool_features=64)),
        ("Mixed_6a", blocks.InceptionB(288)), ("Mixed_6b", blocks.InceptionC(768, channels_7x7=128)),
        ("Mixed_6c", blocks.InceptionC(768, channels_7x7=160)), ("Mixed_6d", blocks.InceptionC(768, channels_7x7=160)),
        ("Mixed_6e", blocks.InceptionC(768, channels_7x7=192)), ("Mixed_7a", blocks.InceptionD(768)),
        ("Mixed_7b", blocks.InceptionE_1(1280)), ("Mixed_7c", blocks.InceptionE_2(2048)),
        ("fc", nn.Linear(2048, 1008)),
    ]:
        layout.add_module(name, layer)
    g = torch.Generator().manual_seed(seed)
    state = layout.state_dict()
    for key, t in state.items():
        if key.endswith("conv.weight"):
            t.copy_(torch.randn(t.shape, generator=g) * (2.0 / t[0].numel()) ** 0.5)
        elif key == "fc.weight":
            t.copy_(torch.randn(t.shape, generator=g) / 2048 ** 0.5)
        elif key == "fc.bias":
            t.zero_()
    return state


@contextlib.contextmanager
def exact_fp32():
    """Inside: TF32 off for cuDNN convs and cuBLAS matmuls; the caller's settings are restored after."""
    if hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cudnn.conv, "fp32_precision"):
        knobs = [(torch.backends.cuda.matmul, "fp32_precision", "ieee"),
                 (torch.backends.cudnn.conv, "fp32_precision", "ieee")]
    else:  # torch < 2.9: only the legacy switches exist
        knobs = [(torch.backends.cuda.matmul, "allow_tf32", False), (torch.backends.cudnn, "allow_tf32", False)]
    saved = [getattr(obj, name) for obj, name, _ in knobs]
    try:
        for obj, name, value in knobs:
            setattr(obj, name, value)
        yield
    finally:
        for (obj, name, _), value in zip(knobs, saved):
            setattr(obj, name, value)


class InceptionFeatures:
    """Callable: uint8 RGB images (N, 3, H, W) -> float32 (N, 2048) pool3 features, in exact fp32."""
    metric = "fid"
    dim = 2048  # pool3

    def __init__(self, network: nn.Module, device: torch.device, protocol: dict):
        self.network, self.device, self.protocol = network, device, protocol

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        # bf16 autocast from a surrounding training context must not reach the feature network.
        with exact_fp32(), torch.autocast(self.device.type, enabled=False):
            (features,) = self.network(images.to(self.device, non_blocking=True))
        return features


def build_inception(weights: str | None = "", device: torch.device | str = "cpu", *,
                    sha256: str | None = WEIGHTS_SHA256, storage_options: dict | None = None,
                    random_seed: int | None = None) -> InceptionFeatures:
    """The feature network from `weights` (path/URL; "" = $ICT_INCEPTION_WEIGHTS), or, with `random_seed`,
    seeded random weights (timing and tests only: the protocol says so and FIDs are meaningless)."""
    device = torch.device(device)
    if random_seed is not None:
        buf = io.BytesIO()
        torch.save(random_inception_state_dict(random_seed), buf)
        data, source = buf.getvalue(), f"random(seed={random_seed})"
    else:
        source = resolve_weights_url(weights)
        data = read_weights(source, sha256, storage_options)
    digest = hashlib.sha256(data).hexdigest()
    if digest != WEIGHTS_SHA256:
        # Not the known file: accept only a plain state dict of tensors (the library unpickles freely).
        try:
            torch.load(io.BytesIO(data), weights_only=True)
        except Exception as err:
            raise InceptionWeightsError(f"Inception weights {source!r} are not a plain state dict: {err}") from err
    network = fidelity_inception_class()("inception-v3-compat", ["2048"],
                                         feature_extractor_weights_path=io.BytesIO(data))
    protocol = {"extractor": "inception", "metric": "fid", "feature_dim": InceptionFeatures.dim,
                "network": "inception-v3 2015-12-05 (TF graph) pool3, 2048-d", "library": f"torch-fidelity "
                f"{fidelity_version()}", "input": "uint8 RGB", "resize": "TF1 bilinear to 299x299, align_corners="
                "False, no antialias", "arithmetic": "float32, TF32 off, autocast off", "weights_sha256": digest,
                "official_weights": digest == WEIGHTS_SHA256, "weights": source}
    return InceptionFeatures(network.to(device), device, protocol)
