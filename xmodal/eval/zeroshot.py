"""Zero-shot classification: the CLIP recipe of prompt-ensembled class embeddings, and top-k hits.

The loop over a loader is :func:`xmodal.eval.loops.evaluate_zeroshot`; the metric is
:class:`xmodal.eval.metrics.TopKAccuracy`.

Models need ``embed_images(images) -> B x D`` (raw ``[0, 1]`` or uint8 images) and
``embed_texts(list[str]) -> B x D`` (as
:class:`xmodal.students.clip.CLIPStudent` has). Embeddings are L2-normalised here again, so any such model works.

Ties: a sample counts as correct at ``k`` when fewer than ``k`` *wrong* classes score at least as high as the
true class (``sum(logits[wrong] >= logits[true]) < k``). Ties are broken against the model, so a collapsed model
whose scores are all equal gets chance-or-worse accuracy, never a perfect one. NaN scores count as ``-inf``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Template = str | Callable[[str], str]


class DualEncoder(Protocol):
    """What evaluation needs of a model (an ``nn.Module`` is put in eval mode and moved; anything else is not)."""

    def embed_images(self, images: Tensor) -> Tensor: ...

    def embed_texts(self, texts: list[str]) -> Tensor: ...


SIMPLE_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)
# The 7-template subset of OpenAI's 80 ImageNet prompts that the CLIP authors found works about as well.
IMAGENET_TEMPLATES_7: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


def topk_hits(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """Number of samples whose label is in the top ``k`` (ties against the model; see the module docstring).

    Args:
        logits: ``N x C`` scores.
        labels: ``N`` class indices.
        ks: the ``k`` values; a ``k`` larger than ``C`` counts every sample as a hit.

    Returns:
        ``{k: hits}``.
    """
    logits = logits.float().nan_to_num(nan=float("-inf"))
    true = logits.gather(1, labels.view(-1, 1).long())
    rank = (logits >= true).sum(1) - 1  # wrong classes scoring >= the true one
    return {k: int((rank < k).sum()) for k in ks}


@contextmanager
def evaluating(model: DualEncoder, device: str | torch.device | None = None) -> Iterator[torch.device]:
    """Run ``model`` in eval mode (its train/eval mode is restored after) and yield the device to feed it on.

    Args:
        model: the model; only an ``nn.Module`` is moved and switched to eval mode.
        device: where to run (the model is moved there and stays); ``None`` keeps the model where it is and
            yields the device of its first parameter or buffer (cpu when it has none).
    """
    if not isinstance(model, nn.Module):
        yield torch.device(device or "cpu")
        return
    if device is not None:
        dev = torch.device(device)
        model.to(dev)
    else:
        tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
        dev = tensor.device if tensor is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        yield dev
    finally:
        model.train(was_training)


def encode_texts(model: DualEncoder, texts: Sequence[str], batch_size: int = 256) -> Tensor:
    """L2-normalised text embeddings, ``len(texts) x D``, computed ``batch_size`` at a time."""
    chunks = [model.embed_texts(list(texts[i : i + batch_size])) for i in range(0, len(texts), batch_size)]
    return F.normalize(torch.cat(chunks).float(), dim=-1)


def fill_template(template: Template, classname: str) -> str:
    """``"a photo of a {}."`` (or ``"{c}"``, or a callable) with the class name filled in."""
    return template(classname) if callable(template) else template.format(classname, c=classname)


@torch.inference_mode()
def class_embeddings(
    model: DualEncoder, classnames: Sequence[str], templates: Sequence[Template], batch_size: int = 256
) -> Tensor:
    """The zero-shot classifier: per class, the mean of its L2-normalised prompt embeddings, re-normalised.

    Args:
        model: has ``embed_texts(list[str]) -> B x D``.
        classnames: ``C`` class names.
        templates: ``T`` prompts with a ``{}`` placeholder (``"a photo of a {}."``), or callables.
        batch_size: prompts encoded per call.

    Returns:
        ``C x D`` L2-normalised class embeddings.
    """
    if not classnames or not templates:
        raise ValueError("class_embeddings needs at least one class name and one template")
    prompts = [fill_template(t, c) for c in classnames for t in templates]
    emb = encode_texts(model, prompts, batch_size).view(len(classnames), len(templates), -1)
    return F.normalize(emb.mean(1), dim=-1)


def cosine_logits(image_emb: Tensor, classifier: Tensor) -> Tensor:
    """``N x C`` scores of image embeddings against L2-normalised class embeddings (the image side is normalised
    here)."""
    return F.normalize(image_emb.float(), dim=-1) @ classifier.T
