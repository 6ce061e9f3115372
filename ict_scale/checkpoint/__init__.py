"""Checkpoint policy (manager, run-dir lease, resume check) and storage (local or s3://); the bytes belong to
the parallel backend."""
from .errors import IncompleteCheckpoint, NoSpaceLeft, RunDirBusy, RunDirError
from .lease import RunLease
from .manager import COMMIT, CheckpointManager
from .storage import Storage, strict_json, torch_bytes

__all__ = ["COMMIT", "CheckpointManager", "IncompleteCheckpoint", "NoSpaceLeft", "RunDirBusy", "RunDirError",
           "RunLease", "Storage", "strict_json", "torch_bytes"]
