"""Checkpoint policy (manager) and storage (local or s3://); the bytes belong to the parallel backend."""
from .manager import COMMIT, CheckpointManager
from .storage import Storage, torch_bytes

__all__ = ["COMMIT", "CheckpointManager", "Storage", "torch_bytes"]
