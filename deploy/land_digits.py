"""Land a task of real handwritten digits (scikit-learn's, offline) in a landing zone, the way
an uploader would: train/test Parquet, ``task.yaml``, then ``_READY``.

    python deploy/land_digits.py landing/ 2026-11-01 --digits 0 1
    python deploy/land_digits.py s3://bucket/landing 2026-11-08 --digits 2 3 --not-ready
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.data import generators
from pipeline.ops import land_task


def digits_parquet(path: Path, split: str, digits: list[int]) -> Path:
    """The digits in ``digits`` of one split as Parquet: PNG ``image``, ``label`` 0-9, class names in the metadata."""
    gen = generators.get("digits")
    images, labels = gen.rows(split, {}, 0, gen.num_rows(split, {}))
    keep = np.flatnonzero(np.isin(labels, digits))
    encoded = []
    for i in keep:
        buf = io.BytesIO()
        Image.fromarray(images[i]).save(buf, format="PNG")
        encoded.append(buf.getvalue())
    table = pa.table({"image": pa.array(encoded, pa.binary()), "label": pa.array(labels[keep], pa.int16())})
    pq.write_table(table.replace_schema_metadata({"classes": json.dumps([str(d) for d in range(10)])}), path)
    return path


def land_digits(landing: str, folder: str, digits: list[int], *, ready: bool = True) -> str:
    manifest = {
        "train": {"type": "parquet", "path": "train.parquet"},
        "test": {"type": "parquet", "path": "test.parquet"},
        "class_subset": digits,
    }
    with tempfile.TemporaryDirectory() as tmp:
        files = {
            f"{split}.parquet": str(digits_parquet(Path(tmp) / f"{split}.parquet", split, digits)) for split in ("train", "test")
        }
        if ready:
            return land_task(landing, folder, files, manifest)
        fs, root = fsspec.core.url_to_fs(landing)  # an upload still in progress: data without _READY
        fs.makedirs(f"{root}/{folder}", exist_ok=True)
        for name, local in files.items():
            fs.put_file(local, f"{root}/{folder}/{name}")
        return f"{landing.rstrip('/')}/{folder}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("landing", help="landing zone: directory or fsspec URI")
    parser.add_argument("folder", help="the task's folder name (its id unless the manifest says otherwise)")
    parser.add_argument("--digits", type=int, nargs="+", required=True, help="the task's classes")
    parser.add_argument("--not-ready", action="store_true", help="leave out _READY (an upload in progress)")
    args = parser.parse_args()
    print(land_digits(args.landing, args.folder, args.digits, ready=not args.not_ready))


if __name__ == "__main__":
    main()
