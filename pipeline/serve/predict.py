"""Batch inference with a registered continual model, on Ray Data.

The input is read by Ray Data (Parquet files with an ``image`` column, or a folder of image
files), decoded and scored in a pool of actors that each rebuild the model once from its
registry card (backbone + memory store), and written by those tasks as Parquet parts under
one output directory: no row passes through the driver. Scores are exactly those of the
evaluation after the task the version was registered at: the same reader and decoding, the
same candidates (every seen class, or one task's classes with its id). An image that cannot
be decoded is a row with a null prediction and the reason, not a failed job.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
import torch

from pipeline.backbones import create_backbone, verify_weight_files
from pipeline.config import MethodConfig, ParquetSource, validate_config
from pipeline.data.ray_data import decode_image
from pipeline.data.sources import IMAGE_SUFFIXES, Chunk, ParquetReader, read_chunks, read_units
from pipeline.errors import ConfigError, DataError, StoreError
from pipeline.memory import MemoryStore
from pipeline.methods import Method, TaskInfo, create_method, method_class, resolve_method_params
from pipeline.serve.registry import ModelCard


def load_model(card: ModelCard, device: torch.device | str = "cpu") -> Method:
    """Backbone + the card's memory-store version -> the method, in the state it was evaluated in."""
    cfg = validate_config(card.config, "model card config")
    verify_weight_files(cfg.backbone, card.weights_sha256, "model card")
    backbone = create_backbone(cfg.backbone).to(device)
    if backbone.backbone_id != card.backbone_id:
        raise StoreError(
            f"model card: made with backbone {card.backbone_id}, but {cfg.backbone.name} builds {backbone.backbone_id}"
        )
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
    """``map_batches`` actor: builds the model once, scores batches of encoded images. An image that
    cannot be decoded gets a null prediction and its reason in ``error``; the others are scored
    as if it were not there. The MLflow pyfunc passes a ``method`` it has built already (one
    model, a Predictor per ``task``)."""

    def __init__(
        self, card_json: str, task: str | None, image_column: str, method: Method | None = None, classes: list[str] | None = None
    ) -> None:
        self.card = ModelCard.from_json(card_json, "model card")
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if method is None else method.device
        self.method = method if method is not None else load_model(self.card, self.device)
        self.candidates = candidates_for(self.card, task, self.method.infers_tasks)
        self.names = [self.card.class_names[c] for c in self.candidates.classes]
        self.image_column = image_column
        self.classes = classes  # the input's label names (Parquet metadata), for label_class

    def _decode(self, batch: dict[str, np.ndarray]) -> tuple[list[np.ndarray | None], list[str | None]]:
        images: list[np.ndarray | None] = []
        errors: list[str | None] = []
        for i, data in enumerate(batch[self.image_column]):
            if "path" in batch:
                where = str(batch["path"][i])
            elif "where" in batch:
                where = f"{batch['where'][i]} row {batch['where_row'][i]}"
            else:
                where = f"image {i} of a batch of {len(batch[self.image_column])}"
            try:
                images.append(decode_image(data, self.card.image_size, where))
                errors.append(None)
            except DataError as exc:
                images.append(None)
                errors.append(str(exc))
        return images, errors

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        images, errors = self._decode(batch)
        ok = np.array([e is None for e in errors], dtype=bool)
        n, c = len(errors), self.candidates
        pred, score = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.float32)
        pred_class = np.full(n, None, dtype=object)
        task = np.full(n, None, dtype=object)
        if ok.any():
            raw = np.stack([im for im in images if im is not None])
            x = self.method.backbone.normalize(torch.from_numpy(raw).to(self.device))
            if c.infer_tasks:
                task_ids = self.method.infer_tasks(x)  # type: ignore[attr-defined]
            elif c.task_index is not None:
                task_ids = torch.full((len(x),), c.task_index, dtype=torch.long, device=self.device)
            else:
                task_ids = None
            probs = self.method.score(x, c.classes, self.names, task_ids).float().softmax(dim=1)
            best = probs.argmax(dim=1).cpu().numpy()
            pred[ok] = np.asarray(c.classes, dtype=np.int64)[best]
            pred_class[ok] = np.asarray(self.names, dtype=object)[best]
            score[ok] = probs.max(dim=1).values.cpu().numpy()
            if task_ids is not None:
                task[ok] = np.asarray([t["id"] for t in self.card.tasks], dtype=object)[task_ids.cpu().numpy()]
        columns: dict[str, pa.Array] = {k: pa.array(batch[k]) for k in ("row", "path", "label") if k in batch}
        if self.classes is not None and "label" in batch:
            columns["label_class"] = pa.array([self.classes[int(i)] for i in batch["label"]], pa.string())
        columns |= {
            "pred": pa.array(pred, mask=~ok), "pred_class": pa.array(pred_class, pa.string()), "score": pa.array(score, mask=~ok),
        }  # fmt: skip
        if c.infer_tasks or c.task_index is not None:
            columns["task"] = pa.array(task, pa.string())
        columns["error"] = pa.array(errors, pa.string())
        return pa.table(columns)


def read_inputs(batch: dict[str, np.ndarray]) -> Iterator[pa.Table]:
    """``map_batches`` UDF: the rows of one read unit of Parquet input (``sources.read_units``),
    images still encoded, with their index in the input (``row``) and their location."""
    for text in batch["unit"]:
        for read in read_chunks([Chunk(**c) for c in json.loads(str(text))]):
            columns = {"row": read.sample_ids, "image": read.images, "where": read.where, "where_row": read.rows}
            yield pa.table(columns | ({} if read.labels is None else {"label": read.labels}))


def _read(data: str, rows_per_chunk: int) -> tuple[ray.data.Dataset, str, list[str] | None]:
    """The input as a Ray Dataset of encoded images, its image column, and the label names its
    Parquet metadata gives. Parquet is read by strata's reader (each row group once, ``row`` =
    the image's index in the input); a folder by Ray Data's binary reader (``path``)."""
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
    source = ParquetSource(path=[fs.unstrip_protocol(p) for p in parquet])
    units = read_units(ParquetReader().chunks(source, rows_per_chunk, columns))
    items = [{"unit": json.dumps([dataclasses.asdict(c) for c in u])} for u in units]
    ds = ray.data.from_items(items, override_num_blocks=max(len(items), 1)).map_batches(read_inputs, batch_size=1)
    return ds, "image", classes


def _count(batch: pa.Table) -> dict[str, list[int]]:
    return {"rows": [batch.num_rows], "errors": [batch.num_rows - batch.column("error").null_count]}


def predict(
    card: ModelCard, data: str, out: str, *, task: str | None = None, batch_size: int = 64, actors: int = 1
) -> dict[str, Any]:
    """Score every image under ``data`` into Parquet files under the directory ``out`` (any fsspec
    URI; it must be new or empty), written by the scoring tasks themselves: no row passes
    through this process. One row per image: ``row`` (Parquet input: its index in the input) or
    ``path`` (image folders), ``label`` (+ ``label_class``) when the input has them, ``pred``
    (stream class id), ``pred_class``, ``score`` (softmax over the candidates), ``task``, and
    ``error``: null, or why the image could not be decoded (its prediction is then null)."""
    # A bad --task, or a til model without one, fails here, before Ray starts work.
    params = resolve_method_params(MethodConfig.model_validate(card.config["method"]))
    candidates_for(card, task, infers_tasks=method_class(params.name).infers_tasks_with(params))
    fs, out_path = fsspec.core.url_to_fs(out)
    if fs.exists(out_path) and (not fs.isdir(out_path) or fs.ls(out_path)):
        raise DataError(f"{out}: exists and is not an empty directory; predictions go to a new directory")
    ds, image_column, classes = _read(data, batch_size)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    scored = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={"card_json": card.to_json(), "task": task, "image_column": image_column, "classes": classes},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
        num_gpus=gpus,
    )
    scored.write_parquet(out)
    if not fs.exists(out_path) or not fs.ls(out_path):
        raise DataError(f"{data}: no images found")
    counts = ray.data.read_parquet(out, columns=["error"]).map_batches(_count, batch_format="pyarrow").sum(["rows", "errors"])
    return {"rows": int(counts["sum(rows)"]), "errors": int(counts["sum(errors)"]), "out": out}
