"""A registered strata version as an MLflow pyfunc model, written from code.

MLflow stores this file with every version (models-from-code: nothing is pickled) beside the
version's card, so MLflow's own API loads a strata model:

    model = mlflow.pyfunc.load_model("models:/digits@champion")
    model.predict(pandas.DataFrame({"image": [png_bytes, ...]}))            # every seen class
    model.predict(frame, params={"task": "2026-11-08"})                      # one task's classes

Loading rebuilds the model exactly as ``strata predict`` does (backbone + the card's memory-store
records, checked against the card's checksums), and ``predict`` scores with the same code, so
both give the same ``pred`` (stream class id), ``pred_class``, ``score`` and, where a task is
given or inferred, ``task``. Loading needs strata installed and the memory store reachable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd


class ContinualModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        import torch

        from pipeline.eval.predict import load_model
        from pipeline.tracking import ModelCard

        self.card_json = Path(context.artifacts["card"]).read_text()
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.method = load_model(ModelCard.from_json(self.card_json, "model card"), device)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from pipeline.eval.predict import Predictor

        predictor = Predictor(self.card_json, (params or {}).get("task"), "image", method=self.method)
        scored = predictor({"image": model_input["image"].to_numpy(dtype=object)})
        return pd.DataFrame(scored)


mlflow.models.set_model(ContinualModel())
