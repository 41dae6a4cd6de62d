"""Where DIKI's accuracy on a task it has not learned comes from: one test set, scored by DIKI
restored from a benchmark run's memory store after its first ``--after`` tasks, with the gate
of each tower as shipped and forced open or shut.

    python bench/diki_transfer.py bench/cache/runs/dil-pacs__diki__clip-offline__seed0 --after 1 --task cartoon

The run directory is one of ``bench/run_quality.py``'s (its config.yaml and memory store); the
test rows are the run's own (the task's test source and ``every``). Each variant gives the
accuracy, the mean image gate and how often each class is predicted, beside the test set's
label counts: a transfer number means little when a variant answers one class for nearly every
image. Writes the result to ``--out`` (default bench/cache/diki_transfer.jsonl, appended) and
prints it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from pipeline.backbones import create_backbone  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data.ray_data import decode_image  # noqa: E402
from pipeline.data.stream import resolve_stream  # noqa: E402
from pipeline.memory import MemoryStore  # noqa: E402
from pipeline.methods import create_method, resolve_method_params  # noqa: E402
from pipeline.methods.zeroshot import clip_logits  # noqa: E402

Gate = Callable[[torch.Tensor], torch.Tensor]  # the shipped per-sample gate -> the gate applied
VARIANTS: dict[str, tuple[Gate, Gate | None]] = {  # image gate, text gate (None: the batch mean of the image gate, as shipped)
    "shipped": (lambda w: w, None),
    "zero-shot (both gates 0)": (torch.zeros_like, lambda w: torch.zeros(())),
    "both gates 1": (torch.ones_like, lambda w: torch.ones(())),
    "image as shipped, text 0": (lambda w: w, lambda w: torch.zeros(())),
    "image 1, text 0": (torch.ones_like, lambda w: torch.zeros(())),
    "image 0, text 1": (torch.zeros_like, lambda w: torch.ones(())),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--after", type=int, required=True, help="restore the first AFTER tasks' records")
    parser.add_argument("--task", required=True, help="the id of the task whose test set is scored")
    parser.add_argument("--out", type=Path, default=REPO / "bench/cache/diki_transfer.jsonl")
    args = parser.parse_args()
    cfg = load_config(args.run / "config.yaml")
    plan = resolve_stream(cfg.stream, cfg.data.rows_per_chunk, with_test=False)
    index = [t.id for t in plan.tasks].index(args.task)
    source = cfg.stream.tasks[index].test
    backbone = create_backbone(cfg.backbone)
    method = create_method(resolve_method_params(cfg.method), backbone)
    method.restore(MemoryStore(str(args.run / "memory")).load_all(upto=args.after))
    table = pq.read_table(source.path)
    ids = np.flatnonzero(np.arange(len(table)) % source.every == 0)
    labels = torch.from_numpy(np.asarray(plan.tasks[index].label_map)[table.column("label").to_numpy()[ids]])
    size = backbone.input_spec.size
    images = torch.from_numpy(
        np.stack(
            [
                decode_image(b, size, f"{source.path} row {i}")
                for b, i in zip(table.column("image").take(ids).to_pylist(), ids, strict=True)
            ]
        )
    )
    candidates = list(plan.tasks[index].classes) if plan.scenario != "dil" else list(range(plan.num_seen(index)))
    prompts = [method.cfg.template.format(plan.class_names[c]) for c in candidates]
    clip = method.clip
    result = {"run": str(args.run), "after": args.after, "task": args.task, "rows": len(ids),
              "labels": torch.bincount(labels, minlength=len(candidates)).tolist(), "variants": {}}  # fmt: skip
    names = [plan.class_names[c] for c in candidates]
    predictions: dict[str, list[torch.Tensor]] = {name: [] for name in VARIANTS}
    gates: dict[str, list[torch.Tensor]] = {name: [] for name in VARIANTS}
    with torch.no_grad():
        for start in range(0, len(images), 100):
            batch = backbone.normalize(images[start : start + 100])
            tasks, shipped = method.infer_tasks(clip.features(batch))  # the frozen forward, once per batch
            for name, (image_gate, text_gate) in VARIANTS.items():
                weight = image_gate(shipped)
                text_weight = weight.mean() if text_gate is None else text_gate(shipped)
                with clip.routing(tasks, gate=weight):
                    image = clip.features(batch)
                logits = torch.empty(len(batch), len(prompts))
                for t in torch.unique(tasks).tolist():
                    with clip.routing(int(t), gate=text_weight.float().expand(len(prompts))):
                        text = clip.encode_text(prompts)
                    logits[tasks == t] = clip_logits(clip, image[tasks == t], text)
                if name == "shipped":  # the replica is the method's own scoring
                    assert torch.equal(logits.argmax(1), method.score(batch, candidates, names).argmax(1))
                predictions[name].append(torch.tensor(candidates)[logits.argmax(1)])
                gates[name].append(weight)
    for name in VARIANTS:
        predicted = torch.cat(predictions[name])
        result["variants"][name] = {
            "accuracy": float((predicted == labels).float().mean()),
            "image_gate": float(torch.cat(gates[name]).mean()),
            "predicted": torch.bincount(predicted, minlength=len(candidates)).tolist(),
        }
        print(f"{name:26s} {json.dumps(result['variants'][name])}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as fh:
        fh.write(json.dumps(result) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
