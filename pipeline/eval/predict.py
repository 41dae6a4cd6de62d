"""Batch inference with a registered continual model, on Ray Data.

The input is read by Ray Data (Parquet files with an ``image`` column, or a folder of image
files), decoded and scored in a pool of actors that each rebuild the model once from its
registry card (backbone + memory store), and streamed back in input order into one Parquet
file. Scores are exactly those of the evaluation after the task the version was registered at:
the same decoding, the same candidates (every seen class, or one task's classes with its id).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
import torch

from pipeline.backbones import create_backbone, verify_weight_files
from pipeline.config import MethodConfig, validate_config
from pipeline.data.ray_data import decode_image
from pipeline.data.sources import IMAGE_SUFFIXES
from pipeline.errors import ConfigError, DataError, StoreError
from pipeline.memory import MemoryStore
from pipeline.methods import Method, TaskInfo, create_method, resolve_method_params
from pipeline.tracking import ModelCard


def load_model(card: ModelCard, device: torch.device | str = "cpu") -> Method:
    """Backbone + the card's memory-store version -> the method, in the state it was evaluated in."""
    cfg = validate_config(card.config, "model card config")
    verify_weight_files(cfg.backbone, card.weights_sha256, "model card")
    backbone = create_backbone(cfg.backbone).to(device)
    if backbone.backbone_id != card.backbone_id:
        raise StoreError(f"model card: made with backbone {card.backbone_id}, but {cfg.backbone.name} builds {backbone.backbone_id}")
    store = MemoryStore(card.memory_store)
    if store.version < card.memory_version:
        raise StoreError(f"{card.memory_store}: holds {store.version} records, the model version needs {card.memory_version}")
    for entry, pinned in zip(store.entries()[: card.memory_version], card.records_sha256, strict=True):
        if entry.sha256 != pinned:  # the store was rolled back and trained again (e.g. --fresh) since this version
            raise StoreError(
                f"{card.memory_store}/{entry.file}: sha256 {entry.sha256[:12]}…, but the model version was made with "
                f"{pinned[:12]}…; the store no longer holds this version"
            )
    method = create_method(resolve_method_params(MethodConfig.model_validate(card.config["method"])), backbone)
    method.restore(store.load_all(backbone_id=card.backbone_id, upto=card.memory_version))
    last = card.tasks[-1]
    method.task = TaskInfo(
        index=len(card.tasks) - 1,
        id=last["id"],
        classes=tuple(last["classes"]),
        num_seen_classes=len(card.class_names),
        class_names=tuple(card.class_names),
        domain=last["domain"],
    )
    return method


@dataclass(frozen=True)
class Candidates:
    """What a prediction chooses among: stream class ids, and the task id a til model is given."""

    classes: tuple[int, ...]
    task_index: int | None  # None: no task id (or the method infers it per sample)
    infer_tasks: bool


def candidates_for(card: ModelCard, task: str | None, infers_tasks: bool) -> Candidates:
    if task is not None:
        ids = [t["id"] for t in card.tasks]
        if task not in ids:
            raise ConfigError(f"--task {task}: not a task of this model version (learned: {', '.join(ids)})")
        index = ids.index(task)
        return Candidates(tuple(card.tasks[index]["classes"]), index, False)
    if card.label_space == "task" and card.scenario == "til" and not infers_tasks:
        raise ConfigError("this til model needs the task of the images: give --task ID")
    return Candidates(tuple(range(len(card.class_names))), None, infers_tasks and card.scenario == "til")


class Predictor:
    """``map_batches`` actor: builds the model once, scores decoded batches. The MLflow pyfunc
    passes a ``method`` it has built already (one model, a Predictor per ``task``)."""

    def __init__(self, card_json: str, task: str | None, image_column: str, method: Method | None = None) -> None:
        self.card = ModelCard.from_json(card_json, "model card")
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if method is None else method.device
        self.method = method if method is not None else load_model(self.card, self.device)
        self.candidates = candidates_for(self.card, task, self.method.infers_tasks)
        self.names = [self.card.class_names[c] for c in self.candidates.classes]
        self.image_column = image_column

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        locations = batch.get("path", [f"image {i} of a batch of {len(batch[self.image_column])}" for i in range(len(batch[self.image_column]))])
        raw = np.stack([decode_image(data, self.card.image_size, str(loc)) for data, loc in zip(batch[self.image_column], locations, strict=True)])
        images = self.method.backbone.normalize(torch.from_numpy(raw).to(self.device))
        c = self.candidates
        if c.infer_tasks:
            task_ids = self.method.infer_tasks(images)  # type: ignore[attr-defined]
        elif c.task_index is not None:
            task_ids = torch.full((len(images),), c.task_index, dtype=torch.long, device=self.device)
        else:
            task_ids = None
        logits = self.method.score(images, c.classes, self.names, task_ids).float()
        probs = logits.softmax(dim=1)
        best = probs.argmax(dim=1).cpu().numpy()
        out = {k: v for k, v in batch.items() if k != self.image_column}
        out["pred"] = np.asarray(c.classes, dtype=np.int64)[best]
        out["pred_class"] = np.asarray(self.names, dtype=object)[best]
        out["score"] = probs.max(dim=1).values.cpu().numpy()
        if task_ids is not None:
            out["task"] = np.asarray([t["id"] for t in self.card.tasks], dtype=object)[task_ids.cpu().numpy()]
        return out


def _read(data: str) -> tuple[ray.data.Dataset, str, list[str] | None]:
    """The input as a Ray Dataset, its image column, and the label names its Parquet metadata gives."""
    fs, path = fsspec.core.url_to_fs(data)
    if not fs.exists(path):
        raise DataError(f"{data}: no such file or directory")
    parquet = [path] if path.endswith(".parquet") else sorted(fs.glob(path.rstrip("/") + "/*.parquet")) if fs.isdir(path) else []
    if not parquet:
        if not fs.isdir(path):
            raise DataError(f"{data}: expected a Parquet file, a directory of Parquet files, or a folder of images")
        ds = ray.data.read_binary_files(data, include_paths=True, file_extensions=[s.lstrip(".") for s in IMAGE_SUFFIXES])
        return ds, "bytes", None
    with fs.open(parquet[0], "rb") as fh:
        schema = pq.read_schema(fh)
    if "image" not in schema.names:
        raise DataError(f"{parquet[0]}: missing column 'image'")
    columns = ["image"] + (["label"] if "label" in schema.names else [])
    classes = json.loads(schema.metadata[b"classes"]) if schema.metadata and b"classes" in schema.metadata else None
    files = [fs.unstrip_protocol(p) for p in parquet]
    return ray.data.read_parquet(files, columns=columns), "image", classes


def predict(card: ModelCard, data: str, out: str, *, task: str | None = None, batch_size: int = 64, actors: int = 1) -> dict[str, Any]:
    """Score every image under ``data`` into the Parquet file ``out`` (input order, one row per image):
    ``row``, ``path`` (image folders) or ``label`` (+ ``label_class``) when the input has them,
    ``pred`` (stream class id), ``pred_class``, ``score`` (softmax over the candidates), ``task``."""
    # A bad --task, or a til model without one, fails here, before Ray starts work.
    candidates_for(card, task, infers_tasks=bool(card.config["method"].get("task_inference", False)))
    context = ray.data.DataContext.get_current()
    preserve_order = context.execution_options.preserve_order
    context.execution_options.preserve_order = True  # a dataset copies the context when created: rows keep input order
    try:
        ds, image_column, classes = _read(data)
    finally:
        context.execution_options.preserve_order = preserve_order
    gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    scored = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={"card_json": card.to_json(), "task": task, "image_column": image_column},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
        num_gpus=gpus,
    )
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    rows = 0
    writer: pq.ParquetWriter | None = None
    try:
        for batch in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
            table = batch.add_column(0, "row", pa.array(np.arange(rows, rows + batch.num_rows, dtype=np.int64)))
            if classes is not None and "label" in table.column_names:
                labels = table.column("label").to_numpy()
                table = table.append_column("label_class", pa.array([classes[i] for i in labels]))
            if writer is None:
                writer = pq.ParquetWriter(out, table.schema)
            writer.write_table(table)
            rows += batch.num_rows
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise DataError(f"{data}: no images found")
    return {"rows": rows, "out": out}
