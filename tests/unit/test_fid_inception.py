"""The feature network: weights resolution and checks, and equality with torch-fidelity's extractor."""
import hashlib
import pickle

import numpy as np
import pytest
import torch

from ict_scale.data.synthetic import synthetic_images
from ict_scale.eval import (WEIGHTS_ENV, WEIGHTS_FILE, WEIGHTS_SHA256, FeatureMoments, InceptionWeightsError,
                            build_inception, frechet_distance, random_inception_state_dict, resolve_weights_url)
from ict_scale.eval.inception import exact_fp32, fidelity_inception_class


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """Seeded random weights of the real architecture, saved as a plain state dict (like the real file)."""
    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    torch.save(random_inception_state_dict(seed=1), path)
    return str(path), hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def ours(weights_file):
    path, digest = weights_file
    return build_inception(path, sha256=digest)  # through our path/checksum logic


@pytest.fixture(scope="module")
def images():
    """Two small uint8 image sets: procedural shapes and uniform noise."""
    real, _ = synthetic_images(torch.arange(3), seed=0, resolution=16)
    noise = torch.randint(0, 256, (2, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return real, noise


@pytest.fixture(scope="module")
def features(weights_file, ours, images):
    """(ours, library's) features of both image sets; the library's extractor is built straight from the file."""
    library = fidelity_inception_class()("inception-v3-compat", ["2048"],
                                         feature_extractor_weights_path=weights_file[0])
    with torch.no_grad():
        return [ours(x) for x in images], [library(x)[0] for x in images]


def exact_fid(x: np.ndarray, y: np.ndarray) -> float:
    """FID of two small feature sets, exact in the sample space: tr sqrt(S1 S2) = ||A1 A2^T||_* / sqrt((n1-1)(n2-1))."""
    a, b = x - x.mean(0), y - y.mean(0)
    n1, n2 = len(x), len(y)
    nuclear = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
    d = x.mean(0) - y.mean(0)
    return float(d @ d + (a * a).sum() / (n1 - 1) + (b * b).sum() / (n2 - 1) - 2 * nuclear)


def test_features_equal_the_library_on_the_same_images(features, ours, weights_file):
    f_ours, f_lib = features
    for a, b in zip(f_ours, f_lib):
        assert a.dtype == torch.float32 and a.shape[1] == 2048
        assert torch.equal(a, b)
    assert f_ours[0].std() > 0.01  # the random network still tells images apart
    assert ours.protocol["official_weights"] is False and ours.protocol["weights_sha256"] == weights_file[1]


def test_fid_equals_the_reference_on_the_library_features(features):
    f_ours, f_lib = features
    stats = []
    for f in f_ours:
        m = FeatureMoments()
        m.add(f[:1])
        m.add(f[1:])  # uneven batches
        stats.append(m.mean_cov())
    fid = frechet_distance(*stats[0], *stats[1]).fid
    assert fid == pytest.approx(exact_fid(*(f.double().numpy() for f in f_lib)), rel=1e-10)


def test_batch_composition_does_not_change_features(features, ours, images):
    torch.testing.assert_close(ours(images[0][1:2]), features[0][0][1:2], rtol=1e-6, atol=1e-6)


def test_weights_location_precedence_and_missing_message(monkeypatch):
    monkeypatch.setenv(WEIGHTS_ENV, "/from/env.pth")
    assert resolve_weights_url("s3://bucket/configured.pth") == "s3://bucket/configured.pth"
    assert resolve_weights_url("") == "/from/env.pth"
    monkeypatch.delenv(WEIGHTS_ENV)
    with pytest.raises(InceptionWeightsError) as err:
        resolve_weights_url("")
    text = str(err.value)
    assert WEIGHTS_FILE in text and WEIGHTS_ENV in text and "eval.inception_weights" in text


def test_missing_file_says_what_to_get_and_where(tmp_path):
    missing = str(tmp_path / "nope" / WEIGHTS_FILE)
    with pytest.raises(InceptionWeightsError) as err:
        build_inception(missing)
    text = str(err.value)
    assert missing in text and WEIGHTS_FILE in text and WEIGHTS_SHA256 in text and WEIGHTS_ENV in text


def test_wrong_checksum_is_refused(weights_file, monkeypatch):
    path, digest = weights_file
    monkeypatch.setenv(WEIGHTS_ENV, path)
    with pytest.raises(InceptionWeightsError) as err:
        build_inception("")  # default expectation: the official file's sha256
    assert digest in str(err.value) and WEIGHTS_SHA256 in str(err.value) and path in str(err.value)


def test_unchecked_file_must_be_a_plain_state_dict(tmp_path):
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps(print))  # anything but tensors would run code in a full unpickle
    with pytest.raises(InceptionWeightsError, match="not a plain state dict"):
        build_inception(str(path), sha256=None)


def test_input_must_be_uint8_rgb(ours):
    with pytest.raises(ValueError, match="uint8"):
        ours(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="uint8"):
        ours(torch.zeros(1, 1, 8, 8, dtype=torch.uint8))


def test_exact_fp32_turns_tf32_off_and_restores():
    conv = torch.backends.cudnn.conv if hasattr(torch.backends.cudnn, "conv") else None
    knob = (conv, "fp32_precision") if conv is not None and hasattr(conv, "fp32_precision") \
        else (torch.backends.cudnn, "allow_tf32")
    before = getattr(*knob)
    with exact_fp32():
        assert getattr(*knob) in ("ieee", False)
    assert getattr(*knob) == before
