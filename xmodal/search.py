"""DisWOT: training-free selection of the student architecture that a given teacher will distil best into.

For one batch, each candidate (randomly initialised, never trained) and the teacher give a *semantic* matrix
(class x class, from the gradient of the cross-entropy with respect to the classifier weights: the Grad-CAM
of the classifier layer) and a *sample-relation* matrix (sample x sample, from features). A candidate whose
matrices are close to the teacher's distils better; the score is minus the two distances, so higher is better:

    E = softmax(z) - onehot(y)                    B x K   (dCE/dlogits, times B)
    A = E^T F / B                                 K x D   (= dCE/dW of the linear classifier z = F W^T + b)
    G_sem = rownorm(A A^T)                        K x K
    G_rel = rownorm(X X^T)                        B x B   (X: features flattened, by default X = F)
    score = -( ||G_sem^t - G_sem^s||_F^2 / K^2 + ||G_rel^t - G_rel^s||_F^2 / B^2 )

``rownorm`` divides each row by its L2 norm. The classifier's weight gradient is computed in closed form from the
logits and the classifier's input, so scoring needs one forward pass per model and no backward pass.

Console verb: ``xmodal search-student --teacher T --candidates cands.yaml --data 'shards-{000..003}.tar'``.

Reference: Dong, Li, Wei, "DisWOT: Student Architecture Search for Distillation WithOut Training", CVPR 2023.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from xmodal.contracts import Batch

Inputs = Tensor | Mapping[str, Any]
Data = Tensor | Batch | tuple[Tensor, Tensor] | Iterable[Any]

CANDIDATES_FORMAT = """\
teacher:                        # optional when --teacher is given
  class_path: torchvision.models.VisionTransformer
  init_args: {image_size: 32, patch_size: 8, num_layers: 4, num_heads: 4, hidden_dim: 128, mlp_dim: 256}
  checkpoint: teacher.pt        # optional: a state_dict (.pt/.pth) or .safetensors file
candidates:
  - name: vit-2x64
    class_path: torchvision.models.VisionTransformer
    init_args: {image_size: 32, patch_size: 8, num_layers: 2, num_heads: 2, hidden_dim: 64, mlp_dim: 128}
"""


def model_logits(model: nn.Module, inputs: Inputs, logits_key: str | None = None, input_key: str = "image") -> Tensor:
    """Logits ``B x K`` of ``model``: xmodal models (with ``output_keys``) get the batch, others ``batch[input_key]``.

    A dict output is read at ``logits_key``, or at its first key ending in ``logits``.
    """
    if isinstance(inputs, Mapping) and not hasattr(model, "output_keys"):
        inputs = inputs[input_key]
    out = model(inputs)
    if isinstance(out, Mapping):
        key = logits_key or next((k for k in out if k.endswith("logits")), None)
        if key is None:
            raise KeyError(f"{type(model).__name__} returned {sorted(out)}; pass logits_key")
        out = out[key]
    return out.float()


def probe(
    model: nn.Module, inputs: Inputs, logits_key: str | None = None, input_key: str = "image",
    relation_module: str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run ``model`` once in eval mode without gradients.

    Returns:
        logits ``B x K``; the input ``F`` (``B x D``) of the last ``nn.Linear`` called with ``K`` outputs (the
        classifier); the relation features ``X`` (``B x -1``): the output of ``relation_module`` if named, else ``F``.
    """
    seen: dict[int, Tensor] = {}
    captured: list[Tensor] = []

    def on_linear(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if isinstance(module, nn.Linear) and args and args[0].dim() == 2:
            seen[module.out_features] = args[0].detach().float()

    handles = [m.register_forward_hook(on_linear) for m in model.modules() if isinstance(m, nn.Linear)]
    if relation_module is not None:
        target = model.get_submodule(relation_module)
        handles.append(target.register_forward_hook(lambda m, a, out: captured.append(out.detach().float())))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model_logits(model, inputs, logits_key, input_key)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    classes = logits.shape[-1]
    if classes not in seen:
        raise ValueError(f"{type(model).__name__}: no nn.Linear with {classes} outputs (the classifier) was called")
    features = seen[classes]
    relation = captured[-1].flatten(1) if captured else features
    return logits, features, relation


def semantic_matrix(logits: Tensor, features: Tensor, labels: Tensor) -> Tensor:
    """``rownorm(A A^T)`` with ``A = (softmax(z) - onehot(y))^T F / B`` the classifier's weight gradient: ``K x K``."""
    error = F.softmax(logits, -1) - F.one_hot(labels, logits.shape[-1]).float()
    grad = error.t() @ features / len(logits)
    return F.normalize(grad @ grad.t(), dim=1)


def relation_matrix(features: Tensor) -> Tensor:
    """``rownorm(X X^T)`` for features ``B x ...`` flattened: ``B x B``."""
    x = features.flatten(1)
    return F.normalize(x @ x.t(), dim=1)


def matrix_distance(a: Tensor, b: Tensor) -> float:
    """``||a - b||_F^2 / n^2`` for two ``n x n`` matrices."""
    return float((a - b).pow(2).sum() / a.numel())


def diswot_score(
    teacher: nn.Module, student: nn.Module, images: Inputs, labels: Tensor | None = None,
    logits_key: str | None = None, input_key: str = "image", relation_module: str | None = None,
    teacher_probe: tuple[Tensor, Tensor, Tensor] | None = None,
) -> float:
    """DisWOT score of ``student`` for ``teacher`` on one batch (see the module docstring); higher is better.

    Args:
        teacher, student: classifiers (a plain ``images -> logits`` module or an xmodal model returning outputs);
            teacher and student must predict the same ``K`` classes.
        images: ``B x C x H x W`` images or a batch dict.
        labels: ``B`` class indices; ``None`` uses the teacher's predictions.
        logits_key, input_key: how logits are read and how a batch dict is fed to plain modules.
        relation_module: submodule name whose output gives the relation features (default: classifier input).
        teacher_probe: the teacher's :func:`probe` on the same batch, to score many candidates at once.

    Returns:
        ``-(d_semantic + d_relation)``; 0 for a student identical to the teacher.
    """
    t_logits, t_feat, t_rel = teacher_probe or probe(teacher, images, logits_key, input_key, relation_module)
    s_logits, s_feat, s_rel = probe(student, images, logits_key, input_key, None)
    if s_logits.shape != t_logits.shape:
        raise ValueError(f"student logits {tuple(s_logits.shape)} vs teacher {tuple(t_logits.shape)}")
    if labels is None:
        labels = t_logits.argmax(-1)
    labels = labels.to(t_logits.device)
    semantic = matrix_distance(semantic_matrix(t_logits, t_feat, labels), semantic_matrix(s_logits, s_feat, labels))
    relation = matrix_distance(relation_matrix(t_rel), relation_matrix(s_rel))
    return -(semantic + relation)


def iter_batches(data: Data, num_batches: int, label_key: str = "label") -> Iterator[tuple[Inputs, Tensor | None]]:
    """``(inputs, labels)`` pairs from a tensor, a batch dict, an ``(images, labels)`` pair or an iterable of them."""
    if isinstance(data, Tensor | Mapping) or (isinstance(data, tuple) and len(data) == 2 and
                                              isinstance(data[0], Tensor)):
        data = [data]
    for i, item in enumerate(data):
        if i >= num_batches:
            return
        if isinstance(item, Mapping):
            yield item, item.get(label_key)
        elif isinstance(item, Tensor):
            yield item, None
        else:
            yield item[0], item[1]


def rank_students(
    teacher: nn.Module, candidates: Mapping[str, nn.Module], data: Data, num_batches: int = 1,
    logits_key: str | None = None, input_key: str = "image", relation_module: str | None = None,
) -> list[tuple[str, float]]:
    """Score every candidate with :func:`diswot_score` (mean over ``num_batches`` batches); best first.

    Args:
        teacher: the teacher classifier.
        candidates: name -> randomly initialised student.
        data: a batch (images tensor, dict, or ``(images, labels)``) or an iterable of batches (a data loader).
        num_batches: batches to average over.

    Returns:
        ``[(name, score), ...]`` sorted by decreasing score (ties keep the candidates' order).
    """
    totals = {name: 0.0 for name in candidates}
    count = 0
    for inputs, labels in iter_batches(data, num_batches):
        t_probe = probe(teacher, inputs, logits_key, input_key, relation_module)
        for name, student in candidates.items():
            totals[name] += diswot_score(teacher, student, inputs, labels, logits_key, input_key, relation_module,
                                         teacher_probe=t_probe)
        count += 1
    if count == 0:
        raise ValueError("rank_students: no batch in data")
    return sorted(((name, total / count) for name, total in totals.items()), key=lambda item: -item[1])


def build_model(spec: Mapping[str, Any], base: Path | None = None) -> nn.Module:
    """A module from ``{class_path, init_args, checkpoint?}`` (jsonargparse resolves ``class_path``)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--model", type=nn.Module)
    config = {"class_path": spec["class_path"], "init_args": dict(spec.get("init_args") or {})}
    model = parser.instantiate_classes(parser.parse_object({"model": config})).model
    if spec.get("checkpoint"):
        path = Path(spec["checkpoint"])
        path = path if path.is_absolute() or base is None else base / path
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    return model


def load_teacher(value: str | None, config: Mapping[str, Any], base: Path) -> nn.Module:
    """``--teacher``: a YAML spec file, else a zoo name or checkpoint folder; without it, the YAML's ``teacher``."""
    if value is None:
        if "teacher" not in config:
            raise SystemExit("xmodal search-student: give --teacher or a 'teacher' entry in the candidates file")
        return build_model(config["teacher"], base)
    if value.endswith((".yaml", ".yml")):
        path = Path(value)
        return build_model(yaml.safe_load(path.read_text()), path.parent)
    from xmodal.zoo import create_model

    return create_model(value)


def load_candidates(config: Mapping[str, Any], base: Path, seed: int) -> dict[str, nn.Module]:
    """Candidates from the YAML's ``candidates`` list, each built right after ``torch.manual_seed(seed)``."""
    entries = config.get("candidates")
    if not isinstance(entries, list) or not entries:
        raise SystemExit(f"xmodal search-student: the candidates file needs a 'candidates' list, e.g.\n"
                         f"{CANDIDATES_FORMAT}")
    models = {}
    for i, entry in enumerate(entries):
        name = str(entry.get("name") or f"{i}:{entry['class_path'].rsplit('.', 1)[-1]}")
        torch.manual_seed(seed)
        models[name] = build_model(entry, base)
    return models


def load_image_batches(shards: str, image_size: int, batch_size: int, num_batches: int) -> list[Batch]:
    """The first ``num_batches`` batches (float images in [0, 1], ``label`` when present) of image shards."""
    import webdataset as wds

    from xmodal.data.decoders import collate_items, decode_sample
    from xmodal.data.wds import expand_shards
    from xmodal.modalities.image import ImageModality

    modality = ImageModality(size=image_size)
    dataset = wds.WebDataset(expand_shards(shards), shardshuffle=False, empty_check=False)
    batches: list[Batch] = []
    items: list[dict[str, Any]] = []
    for sample in dataset:
        items.append(decode_sample(sample, [modality]))
        if len(items) == batch_size:
            batches.append(modality.on_device(collate_items(items, [modality]), train=False))
            items = []
            if len(batches) == num_batches:
                break
    if items and len(batches) < num_batches:
        batches.append(modality.on_device(collate_items(items, [modality]), train=False))
    return batches


def markdown_ranking(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| rank | candidate | DisWOT score | params |", "| ---: | --- | ---: | ---: |"]
    lines += [f"| {r['rank']} | {r['name']} | {r['score']:.6f} | {r['params']:,} |" for r in rows]
    return "\n".join(lines)
