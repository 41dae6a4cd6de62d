import pytest
import torch

from pipeline.backbones import create_backbone
from pipeline.config import BackboneConfig, MethodConfig
from pipeline.methods import TaskInfo, create_method, resolve_method_params
from pipeline.methods.l2p import frequency_penalty, select_prompts

from conftest import REPO, TINY_VIT

KEYS = torch.eye(4)  # key m points along axis m


def test_top_n_by_cosine_per_sample():
    query = torch.tensor([[3.0, 2.0, 0.0, 0.1], [0.0, 0.0, 1.0, 2.0]])
    idx = select_prompts(query, KEYS, 2, batchwise=False)
    assert idx.tolist() == [[0, 1], [3, 2]]


def test_batchwise_majority_gives_every_sample_the_most_frequent_ids():
    query = torch.tensor([[3.0, 2.0, 0.0, 0.0], [2.0, 3.0, 0.0, 0.0], [1.0, 0.0, 2.0, 0.0]])
    # per sample: {0,1}, {1,0}, {2,0} -> counts 0:3, 1:2, 2:1
    idx = select_prompts(query, KEYS, 2, batchwise=True)
    assert idx.tolist() == [[0, 1]] * 3


def test_frequency_penalty_changes_the_choice_as_the_formula_says():
    counts = torch.tensor([90, 0, 10, 0])
    h = frequency_penalty(counts)
    torch.testing.assert_close(h, torch.tensor([91, 1, 11, 1]) / 104.0)
    query = torch.tensor([[0.9, 0.5, 0.0, 0.0]])  # cos to key 0 is highest
    assert select_prompts(query, KEYS, 1, batchwise=False).tolist() == [[0]]
    cos = torch.nn.functional.normalize(query, dim=1)[0]
    distances = (1 - cos) * h  # key 0: (1-0.874)*0.875 = 0.110; key 1: (1-0.486)*0.0096 = 0.005
    assert int(distances.argmin()) == 1
    assert select_prompts(query, KEYS, 1, batchwise=False, penalty=h).tolist() == [[1]]


def l2p(**params):
    backbone = create_backbone(BackboneConfig(**TINY_VIT))
    method = create_method(resolve_method_params(MethodConfig(name="l2p", **params)), backbone)
    method.begin_task(TaskInfo(0, "t", (0, 1), 3, ("a", "b", "c")))
    return backbone, method


def batch(n: int = 8):
    g = torch.Generator().manual_seed(0)
    return {"image": torch.randn(n, 3, 16, 16, generator=g), "label": torch.randint(0, 2, (n,), generator=g)}


def test_gradient_reaches_only_prompts_keys_and_head_and_other_classes_are_masked():
    # A random head: from the official zero head, the prompts' first gradient is zero.
    backbone, method = l2p(pool_size=6, top_n=2, prompt_length=3, batchwise_selection=False, head_init="linear")
    method.training_step(batch()).backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert method.prompts.grad.abs().sum() > 0 and method.keys.grad.abs().sum() > 0
    assert method.head.weight.grad[:2].abs().sum() > 0
    assert torch.equal(method.head.weight.grad[2], torch.zeros(32))  # class 2 is not in this task


def test_key_loss_pulls_selected_keys_toward_their_queries():
    backbone, method = l2p(pool_size=6, top_n=2, prompt_length=3, init_range=(-1.0, 1.0), key_loss_weight=1.0)
    optimizer = torch.optim.Adam([method.keys], lr=0.05)
    b = batch()
    query = torch.nn.functional.normalize(method.frozen_features(b["image"]), dim=-1)

    @torch.no_grad()
    def mean_cos() -> float:
        idx = select_prompts(query, method.keys, 2, batchwise=True)
        return float((torch.nn.functional.normalize(method.keys[idx], dim=-1) * query.unsqueeze(1)).sum(-1).mean())

    before = mean_cos()
    for _ in range(5):
        optimizer.zero_grad()
        method.training_step(b).backward()
        optimizer.step()
    assert mean_cos() > before + 0.05


def test_record_bytes_and_exact_restore():
    backbone, method = l2p()
    method.training_step(batch())
    record = method.end_task()
    m, lp, d, classes = 10, 5, 32, 3
    assert record.nbytes == 4 * (m * lp * d + m * d) + 4 * (classes * d + classes)
    assert sum(record.meta["selection_counts"]) == 8 * 5  # 8 samples x top-5
    fresh = create_method(method.cfg, backbone)
    fresh.restore([record])
    x = batch()["image"]
    assert torch.equal(fresh.predict(x), method.predict(x))


@pytest.mark.parametrize("position", ["prepend", "after_cls"])
def test_head_reads_the_prompt_positions(position):
    backbone, method = l2p(pool_size=4, top_n=2, prompt_length=2, position=position)
    x = batch(2)["image"]
    logits = method.predict(x)
    with torch.no_grad():
        idx = select_prompts(method.frozen_features(x), method.keys, 2, batchwise=True)
        with backbone.routing(None, prompts=method.prompts[idx].flatten(1, 2)):
            tokens = backbone.tokens(x)
        start = 0 if position == "prepend" else 1
        expected = method.head(tokens[:, start : start + 4].mean(1))
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


def test_runs_on_an_open_clip_image_tower():
    backbone = create_backbone(BackboneConfig(name="open_clip:strata-tiny-clip"))
    method = create_method(
        resolve_method_params(MethodConfig(name="l2p", pool_size=4, top_n=2, prompt_length=2, head_init="linear")), backbone
    )
    method.begin_task(TaskInfo(0, "t", (0, 1), 2, ("a", "b")))
    assert method.prompts.shape == (4, 2, 64) and method.keys.shape == (4, 32)  # token width 64, embedding 32
    x = torch.randn(3, 3, 32, 32)
    assert backbone.tokens(x).shape == (3, 1 + 16, 64)
    loss = method.training_step({"image": x, "label": torch.tensor([0, 1, 0])})
    loss.backward()
    assert method.prompts.grad.abs().sum() > 0 and all(p.grad is None for p in backbone.parameters())
    assert method.predict(x).shape == (3, 2)


def test_official_init_zero_head_rows_and_small_keys_and_prompts():
    """google-research/l2p: head kernel and bias start at zero, prompts and keys U(0, 0.01)."""
    backbone, method = l2p()
    assert torch.equal(method.head.weight, torch.zeros(3, 32)) and torch.equal(method.head.bias, torch.zeros(3))
    for tensor in (method.prompts, method.keys):
        assert 0.0 <= float(tensor.min()) and float(tensor.max()) <= 0.01
    method.head.weight.data.fill_(1.0)
    method.begin_task(TaskInfo(1, "u", (3, 4), 5, ("a", "b", "c", "d", "e")))
    assert torch.equal(method.head.weight[:3], torch.ones(3, 32))  # earlier rows kept
    assert torch.equal(method.head.weight[3:], torch.zeros(2, 32))


def test_zero_init_leaves_a_two_class_task_no_shared_offset():
    """With the current-task mask, a 2-class task's two rows get opposite gradients: from zero,
    their sum stays zero (no offset against other tasks' logits); from nn.Linear's init it keeps
    its random start for good."""
    for init, expect_zero_sum in (("zeros", True), ("linear", False)):
        backbone, method = l2p(pool_size=4, top_n=2, prompt_length=2, head_init=init)
        start = (method.head.weight[0] + method.head.weight[1]).detach().clone()
        optimizer = torch.optim.Adam(method.trainable_parameters(), lr=0.01)
        for _ in range(3):
            optimizer.zero_grad()
            method.training_step(batch()).backward()
            optimizer.step()
        shared = method.head.weight[0] + method.head.weight[1]
        if expect_zero_sum:
            torch.testing.assert_close(shared, torch.zeros(32), rtol=0, atol=1e-6)
        else:
            torch.testing.assert_close(shared, start, rtol=0, atol=1e-6)  # the random offset never moves
            assert float(start.abs().max()) > 0.01


def test_single_pass_config_scales_the_official_rate_to_the_batch_and_keeps_the_official_init():
    from pipeline.config import read_yaml

    shipped = read_yaml(REPO / "configs/methods/l2p-single-pass.yaml")["method"]
    backbone = create_backbone(BackboneConfig(**TINY_VIT))
    method = create_method(resolve_method_params(MethodConfig(**shipped)), backbone)
    method.begin_task(TaskInfo(0, "t", (0, 1), 2, ("a", "b")))
    optimizer, _ = method.build_optimizer(total_steps=100, global_batch_size=16)
    head_lr = shipped.get("head_lr") or shipped["lr"]
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == {
        "prompts": shipped["lr"] * 16 / 256,
        "head": head_lr * 16 / 256,
    }
    assert method.cfg.key_init_range == (0.0, 0.01) and method.cfg.init_range == (0.0, 0.01) and method.cfg.head_init == "zeros"


def test_task_stats_count_every_selection_of_the_task():
    backbone, method = l2p(pool_size=6, top_n=2, prompt_length=3, batchwise_selection=False)
    for _ in range(3):
        method.training_step(batch())
    method.end_task()
    histogram = method.task_stats()["prompt_selection"]
    assert len(histogram) == 6 and sum(histogram) == 3 * 8 * 2
    method.begin_task(TaskInfo(1, "u", (2,), 3, ("a", "b", "c")))
    method.end_task()
    assert sum(method.task_stats()["prompt_selection"]) == 0  # a new count per task
    assert method.task_stats()["key_cosine"] is None


def test_task_stats_mean_cosine_of_query_and_selected_keys():
    backbone, method = l2p(pool_size=6, top_n=2, prompt_length=3, batchwise_selection=False)
    batches = [batch(8), batch(4)]
    expected = []
    for b in batches:
        query = torch.nn.functional.normalize(method.frozen_features(b["image"]), dim=-1)
        idx = select_prompts(query, method.keys.detach(), 2, batchwise=False)
        expected.append((torch.nn.functional.normalize(method.keys.detach()[idx], dim=-1) * query.unsqueeze(1)).sum(-1).flatten())
        method.training_step(b)  # no optimizer step: the keys stay as they are
    method.end_task()
    assert method.task_stats()["key_cosine"] == pytest.approx(float(torch.cat(expected).double().mean()), abs=1e-6)


def test_official_cosine_head_switches():
    """google-research/l2p's norm_pre_logits, weight_norm and temperature: with unit-norm pooled
    features and an identity head, the logits times the temperature have norm 1; weight_norm puts
    every non-zero head row at unit norm before the step and leaves zero rows at zero."""
    backbone, method = l2p(pool_size=4, top_n=2, prompt_length=2, norm_pre_logits=True, temperature=0.25)
    width = backbone.token_dim
    method.head.load(torch.eye(width), torch.zeros(width))
    logits = method.predict(batch(3)["image"])
    torch.testing.assert_close((logits * 0.25).norm(dim=1), torch.ones(3))

    backbone, method = l2p(pool_size=4, top_n=2, prompt_length=2, weight_norm=True)
    rows = torch.zeros(3, backbone.token_dim)
    rows[0, 0], rows[1, :2] = 3.0, torch.tensor([3.0, 4.0])
    method.head.load(rows, torch.zeros(3))
    method.training_step(batch())
    assert method.head.weight[:2].norm(dim=1).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    torch.testing.assert_close(method.head.weight[1, :2], torch.tensor([0.6, 0.8]))
    assert torch.equal(method.head.weight[2], torch.zeros(backbone.token_dim))
