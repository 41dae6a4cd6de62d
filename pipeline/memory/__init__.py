from pipeline.memory.store import MemoryStore, RecordEntry, TaskRecord

__all__ = ["MemoryStore", "RecordEntry", "TaskRecord"]
