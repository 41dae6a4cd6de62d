"""Ray Train ``DataConfig`` that gives every row to exactly one worker.

Ray's default split is ``streaming_split(n, equal=True)``, which drops rows to make shards
equal (101 rows on 2 workers -> 50 + 50). strata splits with ``equal=False`` and lets the
training loop absorb uneven shards (see ``pipeline.train.loop``).
"""

from __future__ import annotations

from typing import Any

from ray.data import Dataset, DataIterator
from ray.train import DataConfig


class ExactlyOnceDataConfig(DataConfig):
    def configure(
        self,
        datasets: dict[str, Dataset],
        world_size: int,
        worker_handles: Any,
        worker_node_ids: Any,
        **kwargs: Any,
    ) -> list[dict[str, DataIterator]]:
        output: list[dict[str, DataIterator]] = [{} for _ in range(world_size)]
        hints = worker_node_ids if self._enable_shard_locality else None
        for name, dataset in datasets.items():
            dataset = dataset.copy(dataset)
            dataset.set_name(name)
            dataset.context.execution_options = self._resolve_execution_options(name)
            for rank, shard in enumerate(dataset.streaming_split(world_size, equal=False, locality_hints=hints)):
                output[rank][name] = shard
        return output
