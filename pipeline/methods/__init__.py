"""Continual-learning methods. Importing this package registers every built-in method."""

# Imported for their registration.
from pipeline.methods import diki, finetune, gmm, l2p, lwf, mask_rkr, meat, ncm, piggyback, probe, ranpac, replay, rkr, slda, zeroshot  # noqa: F401  # fmt: skip
from pipeline.methods.base import (
    Batch,
    Collective,
    LocalCollective,
    Method,
    MethodParams,
    ParamGroup,
    TaskInfo,
    available_methods,
    create_method,
    method_class,
    register_method,
    resolve_method_params,
)

__all__ = [
    "Batch",
    "Collective",
    "LocalCollective",
    "Method",
    "MethodParams",
    "ParamGroup",
    "TaskInfo",
    "available_methods",
    "create_method",
    "method_class",
    "register_method",
    "resolve_method_params",
]
