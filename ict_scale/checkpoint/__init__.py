"""A run's state on storage: the Checkpointer (pieces registered by name; save, commit, restore, the resume
check), the checkpoint catalogue (naming, COMMIT marker, keep-last-k), the run-dir lease and storage (local or
s3://). The bytes of model and optimiser belong to the parallel backend. Reading a checkpoint outside a run
(sample, export, evaluate): checkpoint.load. The Checkpointer (checkpoint.checkpointer) is imported from its
module: it reads the config schema, which itself reads storage from here."""
from .errors import IncompleteCheckpoint, NoSpaceLeft, RunDirBusy, RunDirError
from .lease import RunLease
from .manager import COMMIT, CheckpointManager
from .stateful import Stateful
from .storage import Storage, strict_json, torch_bytes

__all__ = ["COMMIT", "CheckpointManager", "IncompleteCheckpoint", "NoSpaceLeft", "RunDirBusy",
           "RunDirError", "RunLease", "Stateful", "Storage", "strict_json", "torch_bytes"]
