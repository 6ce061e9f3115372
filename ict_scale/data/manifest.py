"""The shard manifest: what a shard set holds, shard by shard (written by data_prep, read by the loader)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

MANIFEST_FORMAT = "ict_scale.shards/1"
MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "{prefix}-{index:06d}.tar"


@dataclass
class ShardEntry:
    """One tar shard: its file name (relative to the manifest), sample count, byte size and sha256."""
    name: str
    num_samples: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    """A complete shard set; `build` records the settings that produced it (used to resume a build)."""
    dataset: str
    image_shape: list[int]          # [C, H, W] of every image
    num_classes: int                # 0 = unlabelled
    source: str                     # where the samples came from
    shards: list[ShardEntry] = field(default_factory=list)
    classes_file: str | None = None  # class-index mapping written beside the shards
    build: dict[str, Any] = field(default_factory=dict)
    format: str = MANIFEST_FORMAT

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    def to_json(self) -> str:
        body = asdict(self)
        body["num_samples"] = self.num_samples
        return json.dumps(body, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> "Manifest":
        """Parse and validate; `where` names the file in errors."""
        try:
            body = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(body, dict) or body.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"{where}: expected a manifest with format={MANIFEST_FORMAT!r}, "
                             f"got format={body.get('format') if isinstance(body, dict) else type(body).__name__!r}")
        try:
            shards = [ShardEntry(**s) for s in body["shards"]]
            manifest = cls(dataset=body["dataset"], image_shape=list(body["image_shape"]),
                           num_classes=int(body["num_classes"]), source=body["source"], shards=shards,
                           classes_file=body.get("classes_file"), build=body.get("build", {}))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None
        bad = [s.name for s in shards if s.num_samples <= 0 or "/" in s.name or s.name.startswith(".")]
        if bad:
            raise ValueError(f"{where}: shard entries need a plain file name and num_samples > 0; bad: {bad[:5]}")
        return manifest
