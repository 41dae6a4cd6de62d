"""The import rule: cli, jobs > deploy > tune, ops > run > train > serve, eval > methods >
backbones, data, memory, tracking > config."""

import ast
from pathlib import Path

PIPELINE = Path(__file__).parent.parent / "pipeline"
RANK = {
    "cli": 8, "jobs": 8,
    "deploy": 7,
    "tune": 6, "ops": 6,
    "run": 5,
    "train": 4,
    "serve": 3, "eval": 3,
    "methods": 2,
    "backbones": 1, "data": 1, "memory": 1, "tracking": 1,
    "config": 0, "errors": 0, "jsonout": 0,
}  # fmt: skip


def test_no_module_imports_a_layer_above_its_own():
    violations = []
    for path in PIPELINE.rglob("*.py"):
        parts = path.relative_to(PIPELINE).with_suffix("").parts
        if parts == ("__init__",):
            continue
        own = RANK[parts[0]]
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for name in names:
                if name.startswith("pipeline."):
                    target = name.split(".")[1]
                    if target in RANK and RANK[target] > own:
                        violations.append(f"{path.relative_to(PIPELINE)} imports {name}")
    assert violations == []
    assert {p.name for p in PIPELINE.iterdir() if p.is_dir() and not p.name.startswith("__")} <= set(RANK)
