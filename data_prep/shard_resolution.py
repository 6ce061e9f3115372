"""The image side of a shard set for the data_prep tools: what the manifest records, checked against --resolution."""
from __future__ import annotations

from ict_scale.data.sources import ShardSet


def pick_resolution(shards: ShardSet, requested: int | None, source: str) -> int:
    """The manifest's image side; an explicit `requested` must agree with it, and stands in without a manifest."""
    recorded = shards.image_shape[-1] if shards.image_shape else None
    if requested is not None and recorded is not None and requested != recorded:
        raise SystemExit(f"error: --resolution {requested}, but the manifest of {source} records "
                         f"{recorded}x{recorded} images; leave --resolution out or pass {recorded}")
    if requested is None and recorded is None:
        raise SystemExit(f"error: {source}: no manifest records the image size; pass --resolution")
    return recorded if recorded is not None else requested
