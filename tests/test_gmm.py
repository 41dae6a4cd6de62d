"""GMM: the loss reads the answer tokens only, the zero-initialised projection (and LoRA) is the
frozen captioner exactly, generations map to classes exactly or by similarity and the evaluator
gets both fractions, training moves the answer loss, a record restores the adapter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.backbones import create_backbone
from pipeline.config import BackboneConfig, MethodConfig
from pipeline.data.ray_data import decode_image
from pipeline.errors import ConfigError
from pipeline.methods import TaskInfo, create_method, resolve_method_params
from pipeline.methods.gmm import IGNORE, answer_span, match_scores

from conftest import TINY_VIT, new_method, random_images

COCA = create_backbone(BackboneConfig(name="open_clip:strata-tiny-coca"))
NAMES = ("cat", "golden retriever")
TASK = TaskInfo(index=0, id="t", classes=(0, 1), num_seen_classes=2, class_names=NAMES)


def make(backbone=COCA, **params):
    method = new_method("gmm", backbone, **params)
    method.begin_task(TASK)
    return method


images = random_images


def test_only_the_answer_and_its_end_token_are_targets():
    gmm = make()
    tok = COCA.tokenizer
    prompt, answers = tok.encode("what is this photo of?"), [tok.encode(f"this is a photo of a {n}.") for n in NAMES]
    ids, targets = gmm.sequences(torch.tensor([0, 1]), NAMES)
    for row, answer in enumerate(answers):
        sequence = [tok.sot_token_id, *prompt, *answer, tok.eot_token_id]
        assert ids[row, : len(sequence)].tolist() == sequence and not ids[row, len(sequence) :].any()
        # target j is token j + 1: the prompt's tokens and the padding are not targets
        expected = [IGNORE] * len(prompt) + answer + [tok.eot_token_id]
        assert targets[row].tolist() == expected + [IGNORE] * (targets.shape[1] - len(expected))
    x = images(2)
    loss = gmm.training_step({"image": x, "label": torch.tensor([0, 1])})
    logits = gmm.captioner.logits(gmm.decoder_tokens(x), ids[:, :-1])
    picked = [(r, j) for r in range(2) for j in range(targets.shape[1]) if targets[r, j] != IGNORE]
    by_hand = torch.stack([-F.log_softmax(logits[r, j], dim=-1)[targets[r, j]] for r, j in picked]).mean()
    torch.testing.assert_close(loss, by_hand, rtol=0, atol=1e-5)


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_an_untrained_adapter_is_the_frozen_captioner_exactly(lora_rank):
    x = images(3)
    text = COCA.tokenizer(["this is a photo of a cat."] * 3)[:, :12]
    with torch.no_grad():
        frozen = COCA.model(x, text)["logits"]  # open_clip's own teacher-forced forward
    # LoRA parametrizes the decoder in place: a backbone of its own, the same weights
    gmm = make(create_backbone(BackboneConfig(name="open_clip:strata-tiny-coca")) if lora_rank else COCA, lora_rank=lora_rank)
    assert gmm.captioner.model is not COCA.model or not lora_rank
    # the projection's weight and bias, and A, B of the decoder's self- and cross-attention
    assert len(gmm.trainable_parameters()) == (2 + 4 if lora_rank else 2)
    with torch.no_grad():
        adapted = gmm.captioner.logits(gmm.decoder_tokens(x), text[:, :-1])
    if lora_rank:  # W + 0: the same numbers, though a parametrized MultiheadAttention leaves torch's fused path (~1e-40 apart)
        torch.testing.assert_close(adapted, frozen, rtol=0, atol=1e-30)
    else:
        assert torch.equal(adapted, frozen)


def test_generated_answers_map_to_classes_exactly_or_by_similarity():
    template = "this is a photo of a {}."
    assert answer_span("this is a photo of a golden retriever .", template) == "golden retriever"
    assert answer_span("This is a photo of a  Cat.", template) == "cat"
    assert answer_span("a tabby cat", template) == "a tabby cat"  # no template: the whole answer
    spans, names = ["cat", "kitten", "lion"], ["dog", "cat"]
    span_emb = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    name_emb = torch.tensor([[0.0, 2.0], [3.0, 0.0]])  # dog ~ (0, 1), cat ~ (1, 0)
    logits, exact = match_scores(spans, names, span_emb, name_emb)
    assert exact.tolist() == [[False, True], [False, False], [False, False]]
    torch.testing.assert_close(logits, torch.tensor([[0.0, 3.0], [0.8, 0.6], [1.0, 0.0]]))
    assert logits.argmax(dim=1).tolist() == [1, 0, 0]


def test_score_covers_any_candidates_and_reports_both_fractions(monkeypatch):
    gmm = make()
    answers = ["this is a photo of a cat.", "this is a photo of a lion.", "this is a photo of a golden retriever."]
    monkeypatch.setattr(gmm, "generate", lambda x: answers)
    logits = gmm.score(images(3), [0, 1, 2], ["cat", "golden retriever", "lion"])  # "lion": a future class
    assert logits.argmax(dim=1).tolist() == [0, 2, 1]
    gmm.score(images(3), [0, 1], ["cat", "golden retriever"])  # the seen classes only: "lion" is no name
    stats = gmm.take_eval_stats()
    assert stats["exact_match"].tolist() == [3.0 + 2.0, 6.0] and stats["similarity_match"].tolist() == [1.0, 6.0]
    assert gmm.take_eval_stats() == {}


def test_training_the_projection_lowers_the_answer_loss_and_a_record_restores_it():
    gmm = make(lr=1e-2)
    x, labels = images(8, seed=1), torch.tensor([0, 1] * 4)
    optimizer, _ = gmm.build_optimizer(40, 8)
    first = float(gmm.training_step({"image": x, "label": labels}).detach())
    for _ in range(40):
        gmm.training_step({"image": x, "label": labels}).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    # a random tiny decoder moves only through one cross-attention: 11.24 -> 10.62 measured
    assert float(gmm.training_step({"image": x, "label": labels}).detach()) < first - 0.3
    record = gmm.end_task()
    assert set(record.tensors) == {"proj.weight", "proj.bias"} and record.nbytes == 4 * (32 * 32 + 32)
    fresh = make()
    fresh.restore([record])
    with torch.no_grad():
        assert torch.equal(fresh.decoder_tokens(x), gmm.decoder_tokens(x))


def test_exemplars_are_replayed_with_their_answers_stored_in_the_record_and_restored():
    from pipeline.train.progress import Phase
    from pipeline.train.worker import phase_task_info

    from conftest import task_batches, two_task_plan

    def with_memory():  # begins the plan's tasks, not TASK
        return create_method(resolve_method_params(MethodConfig(name="gmm", memory_size=4)), COCA)

    stream = two_task_plan()
    gmm, records = with_memory(), []
    for index, task in enumerate(stream.tasks):
        gmm.begin_task(phase_task_info(stream, Phase(row=index, tasks=(index,))))
        data = task_batches(task, COCA, image_size=32)
        if index == 1:
            # 8 draws from 4 live exemplars take all of them, and the mean over answer tokens does
            # not depend on the order: the loss is the memoryless loss of the batch plus the memory.
            live = gmm.exemplars.live()
            decoded = torch.from_numpy(np.stack([decode_image(img, 32, "x") for _, img, _ in live]))
            batch = data[0]
            joined = {
                "image": torch.cat([batch["image"], COCA.normalize(decoded)]),
                "label": torch.cat([batch["label"], torch.tensor([c for c, _, _ in live])]),
            }
            memoryless = make()
            memoryless.begin_task(gmm.task)
            with torch.no_grad():  # ~11.4 each, 1 ulp apart here (other batch shapes); a lost exemplar moves it ~0.1
                torch.testing.assert_close(gmm.training_step(batch), memoryless.training_step(joined), rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            for batch in data:
                gmm.training_step(batch)
        records.append(gmm.end_task())
    # 4 // 2 classes after the first task, 4 // 4 per new class after the second; bytes counted.
    assert [np.bincount(r.tensors["exemplars.labels"].numpy()).tolist() for r in records] == [[2, 2], [0, 0, 1, 1]]
    assert records[0].nbytes == 4 * (32 * 32 + 32) + sum(
        t.numel() * t.element_size() for k, t in records[0].tensors.items() if k.startswith("exemplars.")
    )
    assert [c for c, _, _ in gmm.exemplars.live()] == [0, 1, 2, 3] and gmm.task_stats()["exemplars_live"] == 4
    fresh = with_memory()
    fresh.restore(records)
    assert fresh.exemplars.live() == gmm.exemplars.live()


def test_a_backbone_without_a_decoder_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"method.name: gmm needs an open_clip backbone"):
        create_method(resolve_method_params(MethodConfig(name="gmm")), create_backbone(BackboneConfig(**TINY_VIT)))
    with pytest.raises(
        ConfigError, match=r"method.name: gmm needs a captioning backbone \(open_clip:coca_\*\), not open_clip:strata-tiny-clip"
    ):
        create_method(
            resolve_method_params(MethodConfig(name="gmm")), create_backbone(BackboneConfig(name="open_clip:strata-tiny-clip"))
        )


def test_the_zero_shot_reference_is_the_untrained_gmm():
    reference = create_method(resolve_method_params(MethodConfig(name="gmm_zeroshot")), COCA)
    reference.begin_task(TASK)
    x = images(4, seed=3)
    assert reference.trainable_parameters() == [] and reference.end_task().tensors == {}
    assert torch.equal(reference.score(x, [0, 1], NAMES), make().score(x, [0, 1], NAMES))


def test_gmm_through_ray_reports_how_generations_matched(ray_session, tmp_path):
    import json

    import yaml
    from click.testing import CliRunner

    from pipeline.cli import main

    from conftest import blobs_task, run_config

    tasks = [blobs_task("g0", rows=32, subset=[0, 1]), blobs_task("g1", rows=32, subset=[2, 3])]
    config = run_config(tmp_path, tasks, data={"rows_per_chunk": 8, "image_size": 32}, tracking={"enabled": False})
    config["backbone"] = {"name": "open_clip:strata-tiny-coca"}
    config["method"] = {"name": "gmm", "max_new_tokens": 4}
    config["train"]["batch_size"] = 8
    (tmp_path / "stream.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(main, ["run", str(tmp_path / "stream.yaml")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert summary["samples_seen"] == [16, 16] and summary["memory_bytes"] == [4 * (32 * 32 + 32)] * 2
    matrix = summary["accuracy_matrix"]
    assert all(v is not None for row in matrix for v in row)  # zero-shot: future tasks are scored too
    exact, similar = summary["exact_match_matrix"], summary["similarity_match_matrix"]
    assert all(abs(e + s - 1.0) < 1e-9 for er, sr in zip(exact, similar, strict=True) for e, s in zip(er, sr, strict=True))
    assert summary["similarity_match_learned_mean"] is not None
