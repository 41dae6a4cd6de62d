from pipeline.memory.ledger import Ledger
from pipeline.memory.store import MemoryStore, RecordEntry, TaskRecord

__all__ = ["Ledger", "MemoryStore", "RecordEntry", "TaskRecord"]
