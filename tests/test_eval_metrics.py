"""Each torchmetrics Metric in xmodal.eval.metrics gives, over several updates, the numbers of its protocol's rules
applied to all the data at once."""

from __future__ import annotations

import math
import random
from typing import Any

import jiwer
import pytest
import torch

from xmodal.eval.base2novel import harmonic_mean, make_split, subset_hits
from xmodal.eval.bev import detection_metrics
from xmodal.eval.metrics import (
    Base2NovelAccuracy,
    DetectionMAP,
    RetrievalRecall,
    TopKAccuracy,
    TranscriptCER,
    TranscriptWER,
)
from xmodal.eval.retrieval import retrieval_by_mask, retrieval_metrics
from xmodal.eval.zeroshot import topk_hits
from xmodal.modalities.transcript import cer, normalize_transcript, wer

REL = 1e-6


def close(a: Any, b: Any) -> bool:
    return math.isclose(float(a), float(b), rel_tol=REL, abs_tol=1e-12)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...]) -> dict[str, float]:
    return {f"top{k}": hits / len(labels) for k, hits in topk_hits(logits, labels, ks).items()}


def same_text_retrieval(images: torch.Tensor, texts: torch.Tensor, captions: list[str]) -> dict[str, float]:
    ids = torch.tensor([sorted(set(captions)).index(c) for c in captions])
    return retrieval_by_mask(images, texts, ids[:, None] == ids[None, :])


def base2novel_metrics(logits: torch.Tensor, labels: torch.Tensor, split: Any) -> dict[str, float]:
    (base_hits, n_base), (novel_hits, n_novel) = (subset_hits(logits, labels, split.base),
                                                  subset_hits(logits, labels, split.novel))
    base, novel = base_hits / n_base, novel_hits / n_novel
    return {"base": base, "novel": novel, "hm": harmonic_mean(base, novel), "n_base": n_base, "n_novel": n_novel}


def chunks(n: int, parts: int) -> list[slice]:
    """``parts`` consecutive slices of ``range(n)`` of uneven sizes (one may be empty)."""
    cuts = sorted(random.Random(n).sample(range(n + 1), parts - 1))
    bounds = [0, *cuts, n]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


@pytest.mark.parametrize("tied", [False, True])
def test_topk_accuracy_equals_topk_accuracy(tied: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(97, 12, generator=gen)
    if tied:  # integer scores: many ties, which count against the model
        logits = (logits * 2).round()
    labels = torch.randint(0, 12, (97,), generator=gen)
    metric = TopKAccuracy(ks=(1, 5))
    for part in chunks(97, 4):
        metric.update(logits[part], labels[part])
    got = metric.compute()
    want = topk_accuracy(logits, labels, (1, 5))
    assert set(got) == set(want) and all(close(got[k], want[k]) for k in want)
    metric.reset()
    metric.update(logits[:10], labels[:10])
    assert close(metric.compute()["top1"], topk_accuracy(logits[:10], labels[:10], (1,))["top1"])


def test_retrieval_recall_equals_retrieval_metrics() -> None:
    gen = torch.Generator().manual_seed(1)
    images, texts = torch.randn(40, 8, generator=gen), torch.randn(40, 8, generator=gen)
    metric = RetrievalRecall()
    for part in chunks(40, 3):
        metric.update(images[part], texts[part])
    got, want = metric.compute(), retrieval_metrics(images, texts, torch.arange(40))
    assert set(got) == set(want) and all(close(got[k], want[k]) for k in want)


def test_retrieval_recall_with_several_captions_per_image() -> None:
    gen = torch.Generator().manual_seed(2)
    images = torch.randn(20, 8, generator=gen)
    owner = torch.arange(20).repeat_interleave(3)  # three captions per image
    texts = images[owner] + torch.randn(60, 8, generator=gen)
    metric = RetrievalRecall()
    for start in range(0, 20, 7):  # images start..start+7 and their captions
        metric.update(images[start:start + 7], texts[owner.ge(start) & owner.lt(start + 7)],
                      owner[owner.ge(start) & owner.lt(start + 7)] - start)
    got, want = metric.compute(), retrieval_metrics(images, texts, owner)
    assert all(close(got[k], want[k]) for k in want)


def test_retrieval_recall_matching_identical_captions() -> None:
    gen = torch.Generator().manual_seed(3)
    images, texts = torch.randn(30, 8, generator=gen), torch.randn(30, 8, generator=gen)
    captions = [f"a {random.Random(i).choice(['red', 'blue', 'green'])} square" for i in range(30)]
    metric = RetrievalRecall()
    for part in chunks(30, 3):
        metric.update(images[part], texts[part], captions=captions[part])
    got, want = metric.compute(), same_text_retrieval(images, texts, captions)
    assert all(close(got[k], want[k]) for k in want)


def random_sentence(rng: random.Random) -> str:
    words = ["bin", "blue", "at", "F", "2", "now", "Place", "red", "by", "g9", "again", "soon,", "it's"]
    return " ".join(rng.choice(words) for _ in range(rng.randint(0, 7)))


def transcripts(n: int, seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    refs = [random_sentence(rng) or "x" for _ in range(n)]
    hyps = [random_sentence(rng) if rng.random() < 0.7 else ref for ref in refs]
    return refs, hyps


@pytest.mark.parametrize("seed", [0, 1])
def test_cer_wer_equal_transcript_functions_and_jiwer(seed: int) -> None:
    refs, hyps = transcripts(33, seed)
    char, word = TranscriptCER(), TranscriptWER()
    for part in chunks(33, 4):
        char.update(hyps[part], refs[part])
        word.update(hyps[part], refs[part])
    assert close(char.compute(), cer(refs, hyps)) and close(word.compute(), wer(refs, hyps))
    norm_refs, norm_hyps = [normalize_transcript(t) for t in refs], [normalize_transcript(t) for t in hyps]
    assert close(char.compute(), jiwer.cer(norm_refs, norm_hyps))
    assert close(word.compute(), jiwer.wer(norm_refs, norm_hyps))


def test_cer_of_no_reference_character_is_zero() -> None:
    metric = TranscriptCER()
    metric.update(["", ""], ["", "."])
    assert float(metric.compute()) == cer(["", "."], ["", ""]) == 0.0


def random_detections(n: int, seed: int, classes: int = 3) -> tuple[list[dict], list[dict]]:
    gen = torch.Generator().manual_seed(seed)
    preds, truths = [], []
    for i in range(n):
        m = int(torch.randint(0, 5, (), generator=gen))
        gt_boxes = torch.cat([torch.rand(m, 2, generator=gen) * 40 - 20, torch.rand(m, 1, generator=gen),
                              torch.rand(m, 3, generator=gen) * 3 + 0.5, torch.rand(m, 1, generator=gen) * 6], 1)
        truth = {"boxes": gt_boxes, "labels": torch.randint(0, classes, (m,), generator=gen)}
        if i % 2:
            truth["num_points"] = torch.randint(0, 4, (m,), generator=gen)
        k = int(torch.randint(0, 7, (), generator=gen))
        noise = torch.randn(k, 7, generator=gen) * 0.8
        boxes = torch.cat([gt_boxes, torch.rand(max(0, k - m), 7, generator=gen) * 20])[:k] + noise
        labels = torch.cat([truth["labels"], torch.randint(0, classes, (k,), generator=gen)])[:k]
        preds.append({"boxes": boxes, "scores": torch.rand(k, generator=gen), "labels": labels})
        truths.append(truth)
    return preds, truths


def assert_same_detection_metrics(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in ("mAP", "NDS", "mATE", "mASE", "mAOE", "AP@0.5", "AP@1", "AP@2", "AP@4"):
        assert close(got[key], want[key]), key
    for name, row in want["per_class"].items():
        for key, value in row.items():
            assert (got["per_class"][name][key] is None) if value is None else close(got["per_class"][name][key],
                                                                                       value), (name, key)
    assert got["classes_without_gt"] == want["classes_without_gt"] and got["samples"] == want["samples"]


@pytest.mark.parametrize("options", [{}, {"max_range": 15.0, "min_gt_points": 2}])
def test_detection_map_equals_detection_metrics(options: dict) -> None:
    classes = ["car", "pedestrian", "barrier"]
    preds, truths = random_detections(25, 4)
    metric = DetectionMAP(classes, options)
    for part in chunks(25, 4):
        metric.update(preds[part], truths[part])
    want = detection_metrics(preds, truths, classes, **options)
    assert want["mAP"] > 0  # the random predictions are not all misses
    assert_same_detection_metrics(metric.compute(), want)


def test_detection_map_of_empty_samples() -> None:
    metric = DetectionMAP(["car"])
    empty = {"boxes": torch.zeros(0, 7), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    metric.update([empty], [{"boxes": torch.zeros(0, 7), "labels": torch.zeros(0, dtype=torch.long)}])
    assert_same_detection_metrics(metric.compute(), detection_metrics([empty], [{"boxes": torch.zeros(0, 7),
                                                                                 "labels": torch.zeros(0)}], ["car"]))


@pytest.mark.parametrize("tied", [False, True])
def test_base2novel_accuracy_equals_base2novel_metrics(tied: bool) -> None:
    split = make_split([f"class{i}" for i in range(9)])
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(80, 9, generator=gen)
    if tied:
        logits = logits.round()
    labels = torch.randint(0, 9, (80,), generator=gen)
    metric = Base2NovelAccuracy(split)
    for part in chunks(80, 3):
        metric.update(logits[part], labels[part])
    got, want = metric.compute(), base2novel_metrics(logits, labels, split)
    assert got.keys() == want.keys() and all(close(got[k], want[k]) for k in want)


def ddp_worker(rank: int, world: int, port: int, results: Any) -> None:
    """One gloo rank: update every metric with its half of the data; rank 0 reports the synced values."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        values = computed_on(halves(rank))
        if rank == 0:
            results.put(values)
    finally:
        dist.destroy_process_group()


def halves(rank: int | None) -> dict[str, Any]:
    """Rank 0's or rank 1's share of one data set (uneven), or all of it (``None``), in rank order."""
    gen = torch.Generator().manual_seed(7)
    logits, labels = torch.randn(50, 9, generator=gen), torch.randint(0, 9, (50,), generator=gen)
    images, texts = torch.randn(50, 8, generator=gen), torch.randn(50, 8, generator=gen)
    refs, hyps = transcripts(50, 7)
    captions = [f"shape {i % 7}" for i in range(50)]
    preds, truths = random_detections(20, 7)
    data: dict[str, Any] = {"logits": logits, "labels": labels, "images": images, "texts": texts, "refs": refs,
                            "hyps": hyps, "captions": captions, "preds": preds, "truths": truths}
    cut = {k: 8 if k in ("preds", "truths") else 21 for k in data}
    if rank is None:
        return data
    return {k: v[: cut[k]] if rank == 0 else v[cut[k]:] for k, v in data.items()}


def computed_on(data: dict[str, Any]) -> dict[str, float]:
    top, recall, same_text = TopKAccuracy(), RetrievalRecall(), RetrievalRecall()
    char, det = TranscriptCER(), DetectionMAP(["car", "pedestrian", "barrier"])
    b2n = Base2NovelAccuracy(make_split([f"c{i}" for i in range(9)]))
    top.update(data["logits"], data["labels"])
    b2n.update(data["logits"], data["labels"])
    recall.update(data["images"], data["texts"])
    same_text.update(data["images"], data["texts"], captions=data["captions"])
    char.update(data["hyps"], data["refs"])
    det.update(data["preds"], data["truths"])
    detection = det.compute()
    return {**{k: float(v) for k, v in {**top.compute(), **recall.compute(), **b2n.compute()}.items()},
            **{f"same_text_{k}": float(v) for k, v in same_text.compute().items()},
            "cer": float(char.compute()), "mAP": detection["mAP"], "NDS": detection["NDS"]}


def test_metrics_sync_across_ddp_ranks() -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.start_processes(ddp_worker, args=(2, port, results), nprocs=2, join=True, start_method="spawn")
    synced, alone = results.get(), computed_on(halves(None))
    assert synced.keys() == alone.keys() and all(close(synced[k], alone[k]) for k in alone), (synced, alone)
