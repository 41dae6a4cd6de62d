"""The benchmark streams and the quality runner's plan (real data from ../shared/datasets)."""

import json
import sys

import pytest

from pipeline.config import load_config
from pipeline.data.stream import resolve_stream

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import run_quality  # noqa: E402

DATASETS = REPO.parent / "shared/datasets"
needs_datasets = pytest.mark.skipif(not DATASETS.is_dir(), reason=f"{DATASETS} (the shared real datasets) is not here")


@needs_datasets
@pytest.mark.parametrize(
    "stream,scenario,tasks,classes",
    # 10 digits + 7 PACS + 10 clothes + 7 PACS (the same names again) + 10 CIFAR-10, of which
    # dog and horse are PACS names too: 35 distinct classes.
    [("dcil-5", "dcil", 5, 35), ("til-mix", "til", 5, 35), ("dil-pacs", "dil", 4, 7), ("cil-cifar10", "cil", 5, 10)],
)
def test_benchmark_streams_validate_against_the_real_data(stream, scenario, tasks, classes):
    cfg = load_config(REPO / f"configs/benchmarks/{stream}.yaml")
    plan = resolve_stream(cfg.stream, cfg.data.rows_per_chunk)
    assert plan.scenario == scenario and len(plan.tasks) == tasks
    assert len(plan.class_names) == classes
    if stream == "cil-cifar10":
        assert [t.train.num_samples for t in plan.tasks] == [10000] * 5 and plan.tasks[2].class_names == ("deer", "dog")


@needs_datasets
def test_subsampling_keeps_about_the_asked_rows_per_task():
    overrides = run_quality.subsample("cil-cifar10", train_rows=500, test_rows=250)
    assert "stream.tasks.0.train.every=20" in overrides and "stream.tasks.4.test.every=8" in overrides
    cfg = load_config(REPO / "configs/benchmarks/cil-cifar10.yaml", overrides)
    plan = resolve_stream(cfg.stream, cfg.data.rows_per_chunk)
    assert [t.train.num_samples for t in plan.tasks] == [500] * 5 and [t.test.num_samples for t in plan.tasks] == [250] * 5
    # never fewer than asked (a task's step count depends on it): PACS domains keep every row they have under 2x
    pacs = load_config(
        REPO / "configs/benchmarks/dil-pacs.yaml", run_quality.subsample("dil-pacs", train_rows=800, test_rows=200)
    )
    sizes = [t.train.num_samples for t in resolve_stream(pacs.stream, pacs.data.rows_per_chunk).tasks]
    assert min(sizes) >= 800 and min(sizes) // 8 >= run_quality.MIN_STEPS


def test_every_method_runs_on_the_streams_its_scenarios_fit():
    import strata_test_methods  # noqa: F401  (registered test methods are not benchmarked, whatever the test order)
    from pipeline.methods import available_methods

    runs = run_quality.plan(list(run_quality.STREAMS), only=[])
    for stream, row, backbone in runs:
        method = run_quality.VARIANTS[row][0] if row in run_quality.VARIANTS else row
        scenario = load_config(REPO / f"configs/benchmarks/{stream}.yaml").stream.scenario
        assert scenario in available_methods()[method].scenarios
        # zeroshot also reads the captioner's towers contrastively: the gmm rows' reference
        expected = {"zeroshot": {"clip-offline", "coca-offline"}}.get(method)
        if expected is None and method in run_quality.CLIP_METHODS | run_quality.CAPTION_METHODS:
            expected = {"clip-offline" if method in run_quality.CLIP_METHODS else "coca-offline"}
        assert backbone in (expected or {"hybrid-vit", "effl0"})
    planned = {m for _, m, _ in runs}
    library = {name for name, cls in available_methods().items() if cls.__module__.startswith("pipeline.")}
    assert planned == library | set(run_quality.VARIANTS) and "sample_counter" not in planned
    assert set(run_quality.VARIANTS) == {"gmm+exemplars", "gmm+lora", "gmm+lr1e-5", "icarl", "ranpac+ssf"}
    assert run_quality.VARIANTS["ranpac+ssf"][1]("til-mix") == ["method.first_task_adaptation=true"]
    assert run_quality.VARIANTS["gmm+lora"][1]("cil-cifar10") == ["method.lora_rank=8"]
    assert ("cil-cifar10", "icarl", "hybrid-vit") in runs and ("til-mix", "probe", "effl0") in runs
    assert ("til-mix", "piggyback", "effl0") in runs and ("dcil-5", "diki", "clip-offline") in runs
    assert ("cil-cifar10", "zeroshot", "coca-offline") in runs and ("dcil-5", "zeroshot", "clip-offline") in runs
    assert ("cil-cifar10", "gmm", "coca-offline") in runs and ("cil-cifar10", "gmm_zeroshot", "coca-offline") in runs
    # a variant row: gmm with replay's 20 images per class (CIFAR-10: 200)
    assert ("cil-cifar10", "gmm+exemplars", "coca-offline") in runs
    assert run_quality.VARIANTS["gmm+exemplars"][1]("cil-cifar10") == ["method.memory_size=200"]
    assert run_quality.VARIANTS["icarl"] == ("replay", run_quality.icarl)  # replay's memory size comes with the method
    assert run_quality.icarl("cil-cifar10") == ["method.distill=true", "method.classifier=nme"]


def test_results_table_is_generated_from_the_run_files(tmp_path):
    row = {
        "stream": "dil-pacs", "method": "ncm", "backbone": "hybrid-vit", "scenario": "dil", "tasks": ["a", "b"],
        "avg_acc": 0.5, "last_acc": 0.25, "forgetting": 0.125, "bwt": -0.125, "transfer": None, "mtil_average": None,
        "cil_last_acc": None, "task_inference_acc": None, "memory_bytes": [1024, 3072], "samples_seen": [100, 100], "wall_s": 50.0,
        "profile": {"train_rows": 500, "test_rows": 250, "batch_size": 32, "workers": 2}, "steps": [None, None],
    }  # fmt: skip
    (tmp_path / "dil-pacs__ncm__hybrid-vit__seed0.json").write_text(json.dumps(row))
    starved = row | {"method": "finetune", "steps": [120, 99]}
    (tmp_path / "dil-pacs__finetune__hybrid-vit__seed0.json").write_text(json.dumps(starved))
    variant = row | {"method": "gmm", "row": "gmm+exemplars", "backbone": "coca-offline", "steps": [100, 100]}
    (tmp_path / "dil-pacs__gmm+exemplars__coca-offline__seed0.json").write_text(json.dumps(variant))
    # three seeds of one row: mean ± sample std; the fewest steps of any seed; per-task diagnostics averaged
    for seed, (acc, steps, off) in enumerate([(0.5, [110, 105], 0.01), (0.6, [101, 120], 0.02), (0.7, [130, 130], 0.03)]):
        seeded = row | {"method": "piggyback", "seed": seed, "avg_acc": acc, "steps": steps,
                        "task_stats": [{"masked_off": off}, {"masked_off": 2 * off}]}  # fmt: skip
        (tmp_path / f"dil-pacs__piggyback__hybrid-vit__seed{seed}.json").write_text(json.dumps(seeded))
    (tmp_path / "sweeps").mkdir()
    sweep = {"objective": "avg_acc", "trials": [{"config": {"method.lr": 1e-4}, "objective_per_task": [0.5, 0.625]},
             {"config": {"method.lr": 5e-4}, "objective_per_task": [0.25]}], "best": {"config": {"method.lr": 1e-4}}}  # fmt: skip
    (tmp_path / "sweeps" / "piggyback-til-mix.json").write_text(json.dumps(sweep))
    overhead = {"by_method": {"rkr": {"by_workers": [
        {"workers": 1, "repeats": [{"strata": {"samples": 100, "train_s": 2.0}, "dataloader": {"samples": 100, "train_s": 1.0}}],
         "ratio_vs_dataloader": {"median": 0.5}, "end_to_end_ratio_vs_dataloader": {"median": 0.25}, "ratio_vs_predecoded": {"median": 0.4}},
        {"workers": 2, "repeats": [{"strata": {"samples": 100, "train_s": 1.0}, "dataloader": {"samples": 100, "train_s": 1.25}}],
         "ratio_vs_dataloader": {"median": 1.25}, "end_to_end_ratio_vs_dataloader": {"median": 0.5}}],
        "peak_rss": {"1x": {"rows": 64, "train_worker_peak_mib": 1000.0, "ray_total_peak_mib": 4000.0},
                     "10x": {"rows": 640, "train_worker_peak_mib": 1100.0, "ray_total_peak_mib": 4400.0}}}}}  # fmt: skip
    (tmp_path / "overhead.json").write_text(json.dumps(overhead))
    (tmp_path / "findings.md").write_text("## What the rows show\n\n- a finding\n")
    text = run_quality.report(tmp_path, tmp_path / "RESULTS.md")
    assert "\n## What the rows show\n\n- a finding\n" in text
    # piggyback-single-pass.yaml ships lr 1e-4: the sweep's best and the shipped value
    assert "| piggyback-til-mix | method.lr=0.0001 | avg_acc: 50.0 / 62.5 | ✓ | ✓ |" in text
    assert "| piggyback-til-mix | method.lr=0.0005 | avg_acc: 25.0 |  |  |" in text
    assert "| rkr | 1 | 50.0 | 100.0 | 0.50 | 0.25 | 0.40 |" in text and "| rkr | 2 | 100.0 | 80.0 | 1.25 | 0.50 | – |" in text
    assert "| rkr | 64 → 640 | 1000 → 1100 | 4000 → 4400 | 1.10 |" in text
    assert "| ncm | hybrid-vit | 1 | – | 50.0 | 25.0 | 12.5 | -12.5 | – | – | – | – | 2.0 KiB | 50 | 4.0 |" in text
    assert "| finetune | hybrid-vit | 1 | 99 (< 100: does not count) | 50.0 |" in text
    assert "| gmm+exemplars | coca-offline | 1 | 100 | 50.0 |" in text
    assert (
        "| piggyback | hybrid-vit | 3 | 101 | 60.0 ± 10.0 | 25.0 ± 0.0 | 12.5 ± 0.0 |" in text
    )  # the stdev of 0.5, 0.6, 0.7 is 0.1
    assert "| piggyback | hybrid-vit | weights masked off (%) | 2.00 / 4.00 |" in text
    assert run_quality._effective_bins([5, 0, 5, 5, 5]) == pytest.approx(4.0) and run_quality._effective_bins([0, 0]) is None
    assert (tmp_path / "RESULTS.md").read_text() == text
