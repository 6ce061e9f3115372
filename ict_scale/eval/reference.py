"""Reference statistics files: ours, EDM's and ADM's .npz layouts, read through fsspec (local or s3://).

- ours:  mu (D,), sigma (D, D) float64, meta (a JSON string: protocol, source, count), optional features (N, D)
- EDM:   mu, sigma
- ADM:   the reference batch: arr_0 (the images; not needed for FID and ignored), mu, sigma (+ mu_s, sigma_s)
All three can hold Inception-v3 pool3 statistics of the same TF graph, so those are interchangeable; ours may
instead hold our classifier's features (meta.protocol.extractor says which; EDM/ADM files are Inception's).
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import numpy as np

from ict_scale.checkpoint import Storage
from ict_scale.urls import open_url


@dataclass
class RefStats:
    mu: np.ndarray                # (D,) float64
    sigma: np.ndarray             # (D, D) float64
    layout: str                   # "ict_scale" | "edm" | "adm"
    source: str                   # where it was read from
    meta: dict = field(default_factory=dict)
    features: np.ndarray | None = None  # (N, D) float32, for precision/recall (ours only, when stored)


def _split_url(url: str) -> tuple[str, str]:
    parent, _, name = url.rstrip("/").rpartition("/")
    return (parent or "."), name


def save_ref_stats(url: str, mu: np.ndarray, sigma: np.ndarray, meta: dict, features: np.ndarray | None = None,
                   storage_options: dict | None = None) -> None:
    """Write our layout atomically (temporary name + rename locally; one PUT on object stores)."""
    arrays = {"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64),
              "meta": np.array(json.dumps(meta, sort_keys=True))}  # a str array: loads without pickle
    if features is not None:
        arrays["features"] = np.asarray(features, np.float32)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    parent, name = _split_url(url)
    storage = Storage(parent, storage_options)
    storage.makedirs()
    storage.write_bytes(name, buf.getvalue())


def _check(url: str, mu: np.ndarray, sigma: np.ndarray) -> None:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{url}: expected mu (D,) and sigma (D, D), got mu {mu.shape} and sigma {sigma.shape}")
    for key, a in (("mu", mu), ("sigma", sigma)):
        if not np.isfinite(a).all():
            raise ValueError(f"{url}: key {key!r} has non-finite entries")
    asym = float(np.abs(sigma - sigma.T).max())
    if asym > 1e-6 * max(float(np.abs(sigma).max()), 1e-300):
        raise ValueError(f"{url}: key 'sigma' is not symmetric (max |sigma - sigma^T| = {asym:.3e}): not a covariance")


def _read_npz(url: str, npz, with_features: bool):
    keys = set(npz.files)
    missing = {"mu", "sigma"} - keys
    if missing:
        raise ValueError(f"{url}: missing key(s) {sorted(missing)}; expected mu and sigma (our layout, EDM's, "
                         f"or ADM's reference batch), found {sorted(keys)}")
    mu, sigma = npz["mu"].astype(np.float64), npz["sigma"].astype(np.float64)
    _check(url, mu, sigma)
    if "meta" in keys:
        layout, meta = "ict_scale", json.loads(str(npz["meta"]))
    else:
        layout, meta = ("adm" if "arr_0" in keys else "edm"), {}
    features = npz["features"] if with_features and "features" in keys else None
    return mu, sigma, layout, meta, features


def load_ref_stats(url: str, storage_options: dict | None = None, with_features: bool = False) -> RefStats:
    """Read reference statistics in any of the three layouts; bad content raises naming the file and key."""
    try:
        opened = open_url(url, "rb", storage_options)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"reference statistics not found: {url} (make them with "
                                f"`python -m data_prep.ref_stats --data <shards> --out {url}`)") from err
    with opened:  # a seekable file: the zip is read member by member, so ADM's 'arr_0' images are never read
        try:
            npz = np.load(opened, allow_pickle=False)
        except (ValueError, OSError) as err:
            raise ValueError(f"{url}: not an .npz file ({err})") from err
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise ValueError(f"{url}: a single array, not an .npz archive with keys mu and sigma")
        with npz:
            mu, sigma, layout, meta, features = _read_npz(url, npz, with_features)
    if features is not None and (features.ndim != 2 or features.shape[1] != mu.shape[0]):
        raise ValueError(f"{url}: key 'features' has shape {features.shape}, expected (N, {mu.shape[0]})")
    return RefStats(mu, sigma, layout, url, meta, features)
