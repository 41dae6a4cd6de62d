import json

import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.errors import StoreError
from pipeline.memory import MemoryStore, TaskRecord


def record(value: float) -> TaskRecord:
    return TaskRecord({"w": torch.full((3, 4), value), "ids": torch.arange(5)}, meta={"note": "x"})


def fill(tmp_path, n: int = 2) -> MemoryStore:
    store = MemoryStore(str(tmp_path / "mem"))
    for i in range(n):
        store.append(record(float(i)), task_index=i, task_id=f"t{i}", method="ncm", backbone_id="bb@1")
    return store


def test_round_trip_versions_and_bytes(tmp_path):
    store = fill(tmp_path)
    entries = store.entries()
    assert [e.version for e in entries] == [1, 2]
    assert entries[0].memory_bytes == 3 * 4 * 4 + 5 * 8  # float32 payload + int64 payload
    loaded = store.load(entries[1], backbone_id="bb@1")
    assert torch.equal(loaded.tensors["w"], torch.full((3, 4), 1.0))
    assert loaded.meta == {"note": "x"}
    manifest = json.loads((tmp_path / "mem/manifest.json").read_text())
    assert manifest["records"][1]["file"] == "0001-t1.safetensors"


def test_checksum_mismatch_names_the_file(tmp_path):
    store = fill(tmp_path)
    path = tmp_path / "mem" / store.entries()[1].file
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"0001-t1\.safetensors: checksum mismatch"):
        store.verify()
    store.load(store.entries()[0])  # the intact record still loads


def test_interrupted_write_leaves_previous_version(tmp_path, monkeypatch):
    store = fill(tmp_path)
    before = (tmp_path / "mem/manifest.json").read_text()
    real_mv = store.fs.mv

    def crash_on_manifest(src, dst, **kw):
        if dst.endswith("manifest.json"):
            raise OSError("disk full")
        return real_mv(src, dst, **kw)

    monkeypatch.setattr(store.fs, "mv", crash_on_manifest)
    with pytest.raises(OSError):
        store.append(record(9.0), task_index=2, task_id="t2", method="ncm", backbone_id="bb@1")
    assert (tmp_path / "mem/manifest.json").read_text() == before
    assert MemoryStore(str(tmp_path / "mem")).version == 2
    assert MemoryStore(str(tmp_path / "mem")).verify()


def test_truncate_rolls_back(tmp_path):
    store = fill(tmp_path, 3)
    store.truncate(1)
    assert [e.task_id for e in store.entries()] == ["t0"]


def test_refuses_another_backbone(tmp_path):
    store = fill(tmp_path, 1)
    with pytest.raises(StoreError, match=r"made with backbone bb@1, but the current backbone is bb@2"):
        store.load(store.entries()[0], backbone_id="bb@2")


def test_cli_memory_show(tmp_path):
    fill(tmp_path)
    ok = CliRunner().invoke(main, ["memory", "show", str(tmp_path / "mem"), "--json"])
    assert ok.exit_code == 0, ok.output
    assert [e["task_id"] for e in json.loads(ok.output)] == ["t0", "t1"]
    (tmp_path / "mem/0000-t0.safetensors").write_bytes(b"tampered")
    bad = CliRunner().invoke(main, ["memory", "show", str(tmp_path / "mem")])
    assert bad.exit_code == 2
    lines = bad.output.strip().splitlines()
    assert len(lines) == 1 and "0000-t0.safetensors: checksum mismatch" in lines[0]
