import torch
import torch.nn.functional as F

from pipeline.backbones import create_backbone
from pipeline.config import BackboneConfig, MethodConfig
from pipeline.methods import LocalCollective, TaskInfo, create_method, resolve_method_params
from pipeline.methods.gaussian import GaussianAccumulator, TaskGaussians, gate, pack_upper, unpack_upper

NAMES = ("cat", "dog", "emu")


def clip_backbone():
    return create_backbone(BackboneConfig(name="open_clip:strata-tiny-clip"))


def diki(backbone, **params):
    params = {"image_layers": [0, 1], "text_layers": [0, 1], "residual_length": 2, **params}
    return create_method(resolve_method_params(MethodConfig(name="diki", **params)), backbone)


def images(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_before_training_diki_is_zeroshot_exactly():
    backbone = clip_backbone()
    zeroshot = create_method(resolve_method_params(MethodConfig(name="zeroshot")), backbone)
    method = diki(backbone)
    x = images()
    assert torch.equal(method.score(x, [0, 1, 2], NAMES), zeroshot.score(x, [0, 1, 2], NAMES))
    method.begin_task(TaskInfo(0, "t", (0, 1, 2), 3, NAMES))  # V_r = 0: still the frozen model
    with backbone.routing(0):
        torch.testing.assert_close(backbone.features(x), zeroshot.clip.features(x), rtol=0, atol=1e-6)


def test_gaussian_recovers_a_known_distribution_and_packs_exactly():
    g = torch.Generator().manual_seed(0)
    mean = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    a = torch.randn(4, 4, generator=g, dtype=torch.float64)
    cov = a @ a.T + 0.5 * torch.eye(4, dtype=torch.float64)
    samples = mean + torch.randn(40_000, 4, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    acc = GaussianAccumulator(4, torch.device("cpu"))
    for chunk in samples.split(999):
        acc.update(chunk)
    est_mean, est_cov = acc.finalize(eps=0.0)
    torch.testing.assert_close(est_mean, mean, rtol=0, atol=0.05)
    torch.testing.assert_close(est_cov, cov, rtol=0.05, atol=0.05)
    torch.testing.assert_close(est_cov, torch.cov(samples.T), rtol=1e-9, atol=1e-9)  # unbiased, like np.cov
    assert torch.equal(unpack_upper(pack_upper(est_cov), 4), est_cov)
    assert pack_upper(est_cov).numel() == 4 * 5 // 2


def test_gate_separates_in_and_out_of_distribution_features():
    """D = 32 L2-normalised features clustered around one direction (spread 0.05 per dimension).
    In-distribution: log-likelihood ~ +50 -> s/D - 1 ~ 0.6 -> gate ~ 0.65; the antipodal
    feature: log-likelihood ~ -1e4 -> gate ~ 0."""
    g = torch.Generator().manual_seed(0)
    direction = F.normalize(torch.randn(32, generator=g), dim=0)
    train = F.normalize(direction + 0.05 * torch.randn(5000, 32, generator=g), dim=1)
    acc = GaussianAccumulator(32, torch.device("cpu"))
    acc.update(train)
    gaussians = TaskGaussians()
    gaussians.add(*acc.finalize(eps=1e-7))
    inside = F.normalize(direction + 0.05 * torch.randn(1, 32, generator=g), dim=1)
    far = -direction.unsqueeze(0)
    s_in, s_far = gaussians.log_likelihood(inside)[0, 0], gaussians.log_likelihood(far)[0, 0]
    g_in, g_far = gate(s_in, 32, 1.0), gate(s_far, 32, 1.0)
    assert g_in > 0.5, f"in-distribution: log-likelihood {s_in:.1f}, gate {g_in:.3f}"
    assert g_far < 0.01, f"far: log-likelihood {s_far:.1f}, gate {g_far:.2e}"


def test_training_record_bytes_and_exact_restore():
    backbone = clip_backbone()
    method = diki(backbone)
    method.begin_task(TaskInfo(0, "t", (0, 1, 2), 3, NAMES))
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=5.0)
    x = images()
    batch = {"image": x, "label": torch.tensor([0, 1, 2, 0, 1, 2])}
    first = method.training_step(batch).item()
    for _ in range(3):
        optimizer.zero_grad()
        loss = method.training_step(batch)
        loss.backward()
        optimizer.step()
    assert loss.item() < first
    assert all(p.grad is None for p in backbone.parameters())
    record = method.end_task()
    # image tower: 2 layers x (K, V) x (2 heads x L_r 2 x 32); text: 2 x 2 x (2 x 2 x 16); Gaussian D = 32
    assert record.nbytes == 4 * (2 * 2 * (2 * 2 * 32) + 2 * 2 * (2 * 2 * 16) + 32 + 32 * 33 // 2)
    restored = diki(clip_backbone())
    restored.restore([record])
    assert torch.equal(restored.score(x, [0, 1, 2], NAMES), method.score(x, [0, 1, 2], NAMES))
    tasks, weights = method.infer_tasks(backbone.features(x))
    assert tasks.tolist() == [0] * 6 and bool((weights > 0).all())


def test_collective_is_used_for_the_gaussian():
    class Doubling(LocalCollective):
        world_size = 2

        def all_reduce_(self, tensor):
            return tensor.mul_(2)

    backbone = clip_backbone()
    method = create_method(
        resolve_method_params(MethodConfig(name="diki", image_layers=[0], text_layers=[0], residual_length=2)), backbone, Doubling()
    )
    method.begin_task(TaskInfo(0, "t", (0, 1), 2, NAMES[:2]))
    method.training_step({"image": images(4), "label": torch.tensor([0, 1, 0, 1])})
    record = method.end_task()
    assert method._accumulator is not None and float(method._accumulator.count[0]) == 8  # both "ranks" counted
    assert record.tensors["gaussian.mean"].shape == (32,)
