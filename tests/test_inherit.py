"""TinyCLIP weight inheritance: manual slices, hard-concrete gates, exact pruning, Lagrangian, progressive stages."""

from __future__ import annotations

import math
from pathlib import Path

import open_clip
import pytest
import torch

from tests.conftest import tiny_clip_args
from xmodal.students.autoinherit import HardConcreteGate, MaskedCLIP, TowerGates, prune
from xmodal.students.clip import CLIPStudent, save_open_clip_dir
from xmodal.students.inherit import InheritCLIPStudent, inherit_clip, select_layers

CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a red square"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from xmodal.modalities.text import build_word_tokenizer

    return build_word_tokenizer(CAPTIONS, tmp_path_factory.mktemp("tok") / "tokenizer")


def make_teacher(tokenizer: Path, seed: int = 0) -> CLIPStudent:
    """A 4-block vision / 3-block text CLIP (width 32, 2 heads of 16, MLP 128) with random non-trivial LayerNorms."""
    torch.manual_seed(seed)
    args = tiny_clip_args(tokenizer)
    args["vision_cfg"]["layers"], args["text_cfg"]["layers"] = 4, 3
    teacher = CLIPStudent(**args)
    with torch.no_grad():
        for name, p in teacher.model.named_parameters():
            if ".ln_" in name or name.startswith("ln_"):
                p.add_(0.1 * torch.randn_like(p))
    return teacher.eval()


def batch() -> dict[str, object]:
    torch.manual_seed(1)
    return {"image": torch.rand(4, 3, 16, 16), "caption": CAPTIONS}


def test_select_layers() -> None:
    assert select_layers(12, 6, "uniform") == [0, 2, 4, 7, 9, 11]
    assert select_layers(4, 2, "first") == [0, 1]
    assert select_layers(4, 1) == [0]
    assert select_layers(4, [3, 1]) == [1, 3]
    with pytest.raises(ValueError):
        select_layers(4, [4])


@pytest.mark.parametrize("selection", ["uniform", "first"])
def test_layer_only_inheritance_copies_blocks_exactly(tokenizer: Path, selection: str) -> None:
    teacher = make_teacher(tokenizer)
    cfg, state = inherit_clip(teacher, vision_layers=2, text_layers=2, layer_selection=selection)  # type: ignore[arg-type]
    tsd = teacher.model.state_dict()
    vidx, tidx = select_layers(4, 2, selection), select_layers(3, 2, selection)  # type: ignore[arg-type]
    for prefix, idx in (("visual.transformer.resblocks", vidx), ("transformer.resblocks", tidx)):
        for j, i in enumerate(idx):
            for key, value in tsd.items():
                if key.startswith(f"{prefix}.{i}."):
                    assert torch.equal(state[f"{prefix}.{j}." + key[len(f"{prefix}.{i}."):]], value), key
    student = open_clip.CLIP(**cfg)
    student.load_state_dict(state, strict=True)
    for key in ("visual.conv1.weight", "visual.proj", "token_embedding.weight", "text_projection", "logit_scale"):
        assert torch.equal(student.state_dict()[key], tsd[key])


@pytest.mark.parametrize(("vw", "vh", "tw", "th", "e"), [(16, 1, 16, 1, 8), (32, 2, 16, 2, 16), (24, 2, 32, 2, 12)])
def test_width_inheritance_takes_leading_slices(tokenizer: Path, vw: int, vh: int, tw: int, th: int, e: int) -> None:
    teacher = make_teacher(tokenizer)
    cfg, state = inherit_clip(teacher, vision_layers=[1, 3], text_layers=1, vision_width=vw, vision_heads=vh,
                              text_width=tw, text_heads=th, vision_mlp_width=40, text_mlp_width=24, embed_dim=e,
                              layer_selection="first")
    student = open_clip.CLIP(**cfg)
    student.load_state_dict(state, strict=True)  # shapes match the config
    t = teacher.model.state_dict()
    vd, td = vw // vh, tw // th
    src, dst = "visual.transformer.resblocks.3", "visual.transformer.resblocks.1"
    qkv = t[f"{src}.attn.in_proj_weight"].view(3, 2, 16, 32)
    expected = torch.cat([qkv[c, h, :vd, :vw] for c in range(3) for h in range(vh)])
    assert torch.equal(state[f"{dst}.attn.in_proj_weight"], expected)
    out = t[f"{src}.attn.out_proj.weight"].view(32, 2, 16)
    assert torch.equal(state[f"{dst}.attn.out_proj.weight"], torch.cat([out[:vw, h, :vd] for h in range(vh)], 1))
    assert torch.equal(state[f"{dst}.mlp.c_fc.weight"], t[f"{src}.mlp.c_fc.weight"][:40, :vw])
    assert torch.equal(state[f"{dst}.mlp.c_proj.weight"], t[f"{src}.mlp.c_proj.weight"][:vw, :40])
    assert torch.equal(state[f"{dst}.ln_2.weight"], t[f"{src}.ln_2.weight"][:vw])
    bias = t["transformer.resblocks.0.attn.in_proj_bias"].view(3, 2, 16)
    assert torch.equal(state["transformer.resblocks.0.attn.in_proj_bias"],
                       torch.cat([bias[c, h, :td] for c in range(3) for h in range(th)]))
    assert torch.equal(state["visual.positional_embedding"], t["visual.positional_embedding"][:, :vw])
    assert torch.equal(state["visual.class_embedding"], t["visual.class_embedding"][:vw])
    assert torch.equal(state["visual.proj"], t["visual.proj"][:vw, :e])
    assert torch.equal(state["text_projection"], t["text_projection"][:tw, :e])
    assert torch.equal(state["token_embedding.weight"], t["token_embedding.weight"][:, :tw])
    assert student.visual.transformer.resblocks[0].mlp.c_fc.out_features == 40


def test_inherit_student_with_all_layers_reproduces_teacher(tokenizer: Path, tmp_path: Path) -> None:
    teacher = make_teacher(tokenizer)
    folder = save_open_clip_dir(teacher, tmp_path / "teacher")
    student = InheritCLIPStudent(str(folder), vision_layers=4, text_layers=3, tokenizer=str(tokenizer)).eval()
    with torch.no_grad():
        s, t = student(batch()), teacher(batch())
    for key in ("image.emb", "text.emb", "logit_scale"):
        torch.testing.assert_close(s[key], t[key], atol=1e-6, rtol=0)
    assert student.init_args["vision_cfg"]["layers"] == 4 and student.zoo_class_path.endswith("clip.CLIPStudent")
    smaller = InheritCLIPStudent(str(folder), vision_layers=2, text_layers=1, vision_width=16, text_width=16)
    rebuilt = CLIPStudent(**smaller.init_args)
    rebuilt.load_state_dict(smaller.state_dict(), strict=True)


def randomise_gates(masked: MaskedCLIP, seed: int = 5) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for gates in masked.gates.values():
            for p in gates.parameters():
                p.copy_(torch.randn_like(p) * 2.0)
            gates.layer.log_alpha[0] = 3.0  # keep at least one block with a non-zero gate
            gates.layer.log_alpha[-1] = -6.0  # and drop one


@pytest.mark.parametrize("gate_heads", [False, True])
def test_pruned_model_equals_masked_model(tokenizer: Path, gate_heads: bool) -> None:
    masked = MaskedCLIP(make_teacher(tokenizer), gate_heads=gate_heads)
    randomise_gates(masked)
    masked.eval()
    pruned = prune(masked).eval()
    assert pruned.init_args["vision_cfg"]["layers"] < 4 and pruned.init_args["text_cfg"]["layers"] < 3
    n = sum(p.numel() for p in pruned.parameters())
    assert n < sum(p.numel() for p in masked.student.parameters())
    with torch.no_grad():
        m, p = masked(batch()), pruned(batch())
    for key in ("image.emb", "text.emb", "logit_scale"):
        torch.testing.assert_close(p[key], m[key], atol=1e-5, rtol=0)


def test_masked_model_with_open_gates_equals_student(tokenizer: Path) -> None:
    teacher = make_teacher(tokenizer)
    masked = MaskedCLIP(teacher, gate_heads=True).eval()
    with torch.no_grad():
        m, t = masked(batch()), teacher(batch())
    torch.testing.assert_close(m["image.emb"], t["image.emb"], atol=1e-5, rtol=0)
    torch.testing.assert_close(m["text.emb"], t["text.emb"], atol=1e-5, rtol=0)
    p = 1 / (1 + math.exp(-(math.log(19) - 2 / 3 * math.log(1 / 11))))  # P(z != 0) of every gate at init_keep 0.95
    blocks = {"vision": 4, "text": 3}  # one block per tower is floored: its layer gate counts as kept for sure
    kept = sum((1 + (n - 1) * p) * p / n * masked.gates[t].expected_kept()[1]  # type: ignore[operator]
               for t, n in blocks.items())
    total = sum(masked.gates[t].expected_kept()[1] for t in blocks)  # type: ignore[operator]
    assert float(m["sparsity.expected"]) == pytest.approx(kept / total, rel=1e-5)


@pytest.mark.parametrize("training", [True, False])
def test_closed_towers_collapse_unless_one_block_is_floored(tokenizer: Path, training: bool) -> None:
    """Every layer gate shut: without the floor each tower pools the same token for every input (constant
    embeddings, the CLIP loss stuck at ln(batch)); with ``min_layers=1`` the best-scored block stays fully on."""
    embeddings = {}
    for min_layers in (0, 1):
        masked = MaskedCLIP(make_teacher(tokenizer), min_layers=min_layers).train(training)
        with torch.no_grad():
            for gates in masked.gates.values():
                gates.layer.log_alpha.fill_(-20.0)
                gates.layer.log_alpha[1] = -19.0  # the best-scored block: the one the floor keeps
            out = masked(batch())
            layer = masked.gates["vision"].masks(training)["layer"]  # type: ignore[operator]
        assert layer.tolist() == ([0.0, 1.0, 0.0, 0.0] if min_layers else [0.0] * 4)
        embeddings[min_layers] = out
    for key in ("image.emb", "text.emb"):
        closed, floored = embeddings[0][key], embeddings[1][key]
        assert torch.allclose(closed, closed[:1].expand_as(closed), atol=1e-5)  # one embedding for every input
        assert (floored - floored[:1]).abs().amax() > 1e-2
    masked = MaskedCLIP(make_teacher(tokenizer), min_layers=1)
    with torch.no_grad():
        for gates in masked.gates.values():
            gates.layer.log_alpha.fill_(-20.0)
    pruned = prune(masked)
    assert pruned.init_args["vision_cfg"]["layers"] == 1 and pruned.init_args["text_cfg"]["layers"] == 1
    with pytest.raises(ValueError, match="min_layers"):
        MaskedCLIP(make_teacher(tokenizer), min_layers=4)


def test_hard_concrete_probability_and_expected_sparsity_by_hand() -> None:
    gate = HardConcreteGate((1,))
    with torch.no_grad():
        gate.log_alpha.fill_(0.0)
    # P(z != 0) = sigmoid(0 - 2/3 * log(0.1 / 1.1))
    assert float(gate.prob_nonzero()) == pytest.approx(1 / (1 + (1 / 11) ** (2 / 3)), rel=1e-6)
    tower = TowerGates(layers=2, width=4, heads=2, mlp=3, gate_heads=True, init_keep=0.5)
    shift = 2 / 3 * math.log(1 / 11)  # log_alpha = shift gives P = 1/2 exactly
    with torch.no_grad():
        tower.layer.log_alpha.copy_(torch.tensor([100.0, shift]))
        tower.head.log_alpha.copy_(torch.tensor([[100.0, -100.0], [shift, shift]]))  # type: ignore[union-attr]
        tower.mlp.log_alpha.copy_(torch.tensor([[100.0, 100.0, -100.0], [shift, 100.0, -100.0]]))
    c_head, c_neuron = 4 * 4 * 2 + 3 * 2, 2 * 4 + 1  # 38, 9
    kept = 1 * (1 * c_head + 2 * c_neuron) + 0.5 * (1 * c_head + 1.5 * c_neuron)
    total = 2 * (2 * c_head + 3 * c_neuron)
    got_kept, got_total = tower.expected_kept()
    assert got_total == total
    assert float(got_kept) == pytest.approx(kept, rel=1e-5)


def test_lagrangian_by_hand_and_multipliers_ascend() -> None:
    from xmodal.losses.sparsity import SparsityLagrangianLoss

    loss = SparsityLagrangianLoss(target=0.5, warmup_steps=4)
    with torch.no_grad():
        loss.lambda1.fill_(2.0)
        loss.lambda2.fill_(3.0)
    s = torch.tensor(0.8, requires_grad=True)
    value = loss(s, None, {})  # step 0: target 1.0 -> gap -0.2
    assert float(value) == pytest.approx(2.0 * -0.2 + 3.0 * 0.04, rel=1e-6)
    value = loss(s, None, {})  # step 1: target 1 - 0.5 / 4 = 0.875 -> gap -0.075
    assert float(value) == pytest.approx(2.0 * -0.075 + 3.0 * 0.075**2, rel=1e-6)
    value.backward()
    assert float(loss.lambda1.grad) == pytest.approx(0.075, rel=1e-5)  # reversed: d/dlambda1 = gap = -0.075
    assert float(s.grad) == pytest.approx(2.0 + 2 * 3.0 * -0.075, rel=1e-5)
    loss.step.fill_(10)
    assert loss.current_target() == 0.5


def test_progressive_two_stages_shrink_and_export_open_clip(shapes_dir: Path, tmp_path: Path) -> None:
    from xmodal.progressive import compress
    from xmodal.zoo import create_model

    torch.manual_seed(0)
    args = tiny_clip_args(shapes_dir / "tokenizer")
    args["vision_cfg"]["layers"], args["text_cfg"]["layers"] = 3, 2
    teacher_dir = save_open_clip_dir(CLIPStudent(**args), tmp_path / "teacher")
    fit = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_steps": 2, "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False},
        "model": {"losses": [{"class_path": "AffinityMimicLoss"}]},
        "data": {"modalities": [{"class_path": "ImageModality", "init_args": {"size": 16}},
                                {"class_path": "TextModality"}],
                 "train": str(shapes_dir / "train-*.tar"), "batch_size": 8, "num_workers": 0},
    }
    gates = {"init_keep": 1 / 12, "init_noise": 1.0}  # about half of the gates start closed
    spec = {"teacher": str(teacher_dir), "tokenizer": str(shapes_dir / "tokenizer"), "out_dir": str(tmp_path / "out"),
            "fit": fit, "stages": [{"target": 0.5, "max_steps": 2, **gates}, {"target": 0.25, "max_steps": 2, **gates}]}
    stages = compress(spec)
    counts = [sum(p.numel() for p in CLIPStudent(**args).parameters())]
    for folder in stages:
        model = open_clip.create_model(f"local-dir:{folder}")
        zoo = create_model(str(folder))
        assert isinstance(zoo, CLIPStudent)
        for key, value in model.state_dict().items():
            assert torch.equal(zoo.model.state_dict()[key], value), key
        counts.append(sum(p.numel() for p in zoo.parameters()))
    assert counts[0] > counts[1] > counts[2]


def test_stage_config_reads_the_teacher_cache_and_numbers_stages() -> None:
    from xmodal.progressive import stage_config

    spec = {"teacher": "t", "out_dir": "o", "teacher_cache": "cache",
            "fit": {"trainer": {"callbacks": [{"init_args": {"out_json": "probe-stage{stage}.json"}}]},
                    "data": {"train": "raw-*.tar"}}}
    config = stage_config(spec, {"max_steps": 3}, "src", 0.5, "log", number=2)
    teacher = config["model"]["teacher"]
    assert teacher["class_path"].endswith("CachedTeacher")
    assert teacher["init_args"]["manifest"] == str(Path("cache") / "manifest.json")
    assert teacher["init_args"]["teacher"]["init_args"]["model_name"] == "local-dir:t"
    assert config["data"]["train"] == str(Path("cache") / "train-*.tar")
    assert config["trainer"]["callbacks"][0]["init_args"]["out_json"] == "probe-stage2.json"
    assert config["model"]["student"]["init_args"]["student"]["init_args"]["teacher_dir"] == "src"
    assert spec["fit"]["data"]["train"] == "raw-*.tar"  # the shared fit section is not modified
