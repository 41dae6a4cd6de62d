"""Two real gloo ranks with uneven shards train exactly like one process on the global batches."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from pipeline.config import MethodConfig
from pipeline.methods import LocalCollective, TaskInfo, create_method, resolve_method_params
from pipeline.train.collective import TorchCollective
from pipeline.train.loop import StepSettings, train_phase

from test_methods import flat_backbone

INFO = TaskInfo(index=0, id="t", classes=(0, 1, 2), num_seen_classes=3, class_names=("0", "1", "2"))


def data(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 2, 2, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return [
        {"image": x[i : i + 2], "label": y[i : i + 2], "task": torch.zeros(len(y[i : i + 2]), dtype=torch.long)}
        for i in range(0, n, 2)
    ]


SHARDS = {0: data(5, 1), 1: data(2, 2)}  # batches of 2, 2, 1 on rank 0 and 2 on rank 1


def make_method(collective):
    torch.manual_seed(0)
    m = create_method(
        resolve_method_params(MethodConfig(name="finetune", lr=0.5, optimizer="sgd", momentum=0.0)), flat_backbone(), collective
    )
    m.begin_task(INFO)
    return m


def worker(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    m = make_method(TorchCollective())
    stats = train_phase(m, lambda: SHARDS[rank], StepSettings(num_tasks=1, num_samples=7, global_batch_size=4))
    save_file(
        {"w": m.head.weight.detach(), "b": m.head.bias.detach(), "n": torch.tensor(stats.samples_per_task)},
        f"{out}/rank{rank}.safetensors",
    )
    dist.destroy_process_group()


def test_uneven_shards_match_single_process(tmp_path):
    mp.start_processes(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    assert torch.equal(ranks[0]["w"], ranks[1]["w"]) and torch.equal(ranks[0]["b"], ranks[1]["b"])
    assert ranks[0]["n"].tolist() == [7]  # every sample once, summed over ranks
    # The same three global steps in one process: {r0 b0 + r1 b0}, {r0 b1}, {r0 b2}.
    r0, r1 = SHARDS[0], SHARDS[1]
    merged = [{k: torch.cat([r0[0][k], r1[0][k]]) for k in r0[0]}, r0[1], r0[2]]
    single = make_method(LocalCollective())
    train_phase(single, lambda: merged, StepSettings(num_tasks=1, num_samples=7, global_batch_size=4))
    torch.testing.assert_close(ranks[0]["w"], single.head.weight.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(ranks[0]["b"], single.head.bias.detach(), rtol=0, atol=1e-6)


def gaussian_worker(rank: int, init_file: str, out: str) -> None:
    from pipeline.methods.gaussian import GaussianAccumulator

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    features = torch.randn(50, 6, generator=torch.Generator().manual_seed(10 + rank), dtype=torch.float64)
    acc = GaussianAccumulator(6, torch.device("cpu"))
    acc.update(features[: 17 + 20 * rank])  # uneven shares: 17 and 37 rows
    acc.reduce(TorchCollective())
    mean, cov = acc.finalize(eps=1e-7)
    save_file({"mean": mean, "cov": cov}, f"{out}/gauss{rank}.safetensors")
    dist.destroy_process_group()


def test_gaussian_over_two_ranks_equals_single_process(tmp_path):
    from pipeline.methods.gaussian import GaussianAccumulator

    mp.start_processes(gaussian_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [load_file(tmp_path / f"gauss{r}.safetensors") for r in range(2)]
    union = torch.cat(
        [
            torch.randn(50, 6, generator=torch.Generator().manual_seed(10 + r), dtype=torch.float64)[: 17 + 20 * r]
            for r in range(2)
        ]
    )
    single = GaussianAccumulator(6, torch.device("cpu"))
    single.update(union)
    mean, cov = single.finalize(eps=1e-7)
    for result in ranks:
        torch.testing.assert_close(result["mean"], mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(result["cov"], cov, rtol=0, atol=1e-6)
