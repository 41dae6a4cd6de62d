"""A registered strata version as an MLflow pyfunc model, loaded by this installed module.

A registry version holds data only: its ``MLmodel`` names this module as the pyfunc's
``loader_module`` and its data is the version's card (``data/continual_model.json``); no code,
no pickle. Load a version with :func:`load`, which checks that the downloaded model directory is
exactly what strata registers before MLflow loads it:

    from pipeline.serve.pyfunc import load
    model = load("models:/digits@champion")
    model.predict(pandas.DataFrame({"image": [png_bytes, ...]}))            # every seen class
    model.predict(frame, params={"task": "2026-11-08"})                      # one task's classes

``mlflow.pyfunc.load_model`` loads an untampered version the same way, but it trusts whatever
``MLmodel`` says: whoever can write a version's artifacts could make it import code they wrote.
Loading rebuilds the model exactly as ``strata predict`` does (backbone + the card's memory-store
records, checked against the card's checksums), and ``predict`` scores with the same code, so
both give the same ``pred`` (stream class id), ``pred_class``, ``score`` and, where a task is
given or inferred, ``task``. Loading needs strata installed and the memory store reachable.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from pipeline.serve.predict import Predictor, load_model
from pipeline.serve.registry import ModelCard
from pipeline.serve.registry import download_model, verify_model_dir

LOADER_MODULE = __name__


class ContinualPyfunc:
    """The pyfunc implementation MLflow wraps: one model, a Predictor per ``task`` asked for."""

    def __init__(self, card_json: str) -> None:
        self.card_json = card_json
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.method = load_model(ModelCard.from_json(card_json, "model card"), device)

    def predict(self, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        predictor = Predictor(self.card_json, (params or {}).get("task"), "image", method=self.method)
        return predictor({"image": model_input["image"].to_numpy(dtype=object)}).to_pandas()


def _load_pyfunc(data_path: str) -> ContinualPyfunc:
    """MLflow's loader-module entry point: ``data_path`` is the version's card."""
    return ContinualPyfunc(Path(data_path).read_text())


def load(model_uri: str, tracking_uri: str | None = None) -> Any:
    """``mlflow.pyfunc.load_model`` of a strata version, after checking that its directory holds
    nothing but what strata registers (refused with one line otherwise, before anything loads)."""
    import mlflow.pyfunc

    with tempfile.TemporaryDirectory() as tmp:
        local = download_model(model_uri, tmp, tracking_uri)
        verify_model_dir(local, LOADER_MODULE, model_uri)
        return mlflow.pyfunc.load_model(str(local))
