"""Per-term gradient diagnostics: which loss term drives the student, which vanishes, which fights the task.

:func:`diagnose` runs a :class:`~xmodal.distiller.Distiller`'s student and losses on one batch and, for each
loss term, takes the gradient of ``weight * term`` with respect to the student's trainable parameters
(``torch.autograd.grad`` per term on one shared graph, so nothing is written to ``.grad``). The parameters are
grouped into named parts (front end, encoder, head, ...). For every term it reports its value, its weighted gradient
norm per part, the ratio of that norm to the task loss's, and the cosine between its gradient and the task loss's.
The *task* loss is the sum of the student-only terms (``teacher_key is None``: the cross-entropy, CTC, contrastive
loss a student trained alone would use) unless the terms are named. :meth:`Diagnostics.table` flags a distillation
term that dominates the task (gradient norm > 10x), vanishes (< 0.01x) or fights it (cosine < -0.1).

The measurement leaves training as it was: random-number generators, buffers (BatchNorm statistics, loss step
counters) and the modules' plain attributes are restored afterwards (see :func:`preserved_state`).
:func:`auto_weights` turns one measurement into loss weights with a stated gradient-norm ratio to the task; the
:class:`~xmodal.callbacks.GradientDiagnostics` callback does both during ``fit``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from xmodal.contracts import Batch
from xmodal.distiller import Distiller

ALL = "all"  # the key of the whole student among the parts
DOMINATES = 10.0  # a term whose gradient norm is above this multiple of the task's dominates it
VANISHES = 0.01  # ... below this multiple, vanishes
FIGHTS = -0.1  # a cosine with the task's gradient below this fights the task
Parts = Mapping[str, Sequence[str]]


@dataclass(frozen=True)
class TermDiagnostics:
    """One loss term's measurement; every per-part dict also has the whole student under ``"all"``.

    Attributes:
        name, weight, value: the term's name, weight and (unweighted) value.
        task: whether the term is part of the task loss.
        grad_norm: norm of the gradient of ``weight * term`` per part (parameters it does not reach count as 0).
        ratio: ``grad_norm`` over the task loss's, per part (NaN where the task's is 0).
        cos_task: cosine between this term's gradient and the task loss's, per part (NaN where either is 0).
        shared_norm, task_shared_norm: this term's and the task loss's gradient norms on the parameters that both
            reach (what :func:`auto_weights` balances).
    """

    name: str
    weight: float
    value: float
    task: bool
    grad_norm: dict[str, float]
    ratio: dict[str, float]
    cos_task: dict[str, float]
    shared_norm: float
    task_shared_norm: float

    @property
    def flags(self) -> list[str]:
        """``dominates``, ``vanishes``, ``fights``: what a distillation term does to the task (none for task terms)."""
        if self.task:
            return []
        ratio, cosine = self.ratio[ALL], self.cos_task[ALL]
        flags = ["dominates"] if ratio > DOMINATES else ["vanishes"] if ratio < VANISHES else []
        return flags + (["fights"] if cosine < FIGHTS else [])


@dataclass(frozen=True)
class Diagnostics:
    """The measurement of every loss term on one batch.

    Attributes:
        parts: the part names, in order (the whole student, ``"all"``, is not among them).
        task_terms: the names of the terms summed into the task loss.
        task_grad_norm: the task loss's gradient norm per part and ``"all"``.
        terms: one :class:`TermDiagnostics` per loss term, in the distiller's order.
    """

    parts: list[str]
    task_terms: list[str]
    task_grad_norm: dict[str, float]
    terms: list[TermDiagnostics]

    def term(self, name: str) -> TermDiagnostics:
        for term in self.terms:
            if term.name == name:
                return term
        raise KeyError(f"no loss term {name!r}; the terms are {[t.name for t in self.terms]}")

    def metrics(self, prefix: str = "diag") -> dict[str, float]:
        """Flat values to log: ``<prefix>/<term>/value``, ``/grad_<part>``, ``/ratio``, ``/cos_task``,
        ``/cos_task_<part>`` (``grad_all`` is the whole student); undefined (NaN) values are left out."""
        values: dict[str, float] = {}
        for term in self.terms:
            key = f"{prefix}/{term.name}"
            values[f"{key}/value"] = term.value
            values.update({f"{key}/grad_{part}": norm for part, norm in term.grad_norm.items()})
            values[f"{key}/ratio"] = term.ratio[ALL]
            values[f"{key}/cos_task"] = term.cos_task[ALL]
            values.update({f"{key}/cos_task_{part}": term.cos_task[part] for part in self.parts})
        return {key: value for key, value in values.items() if not math.isnan(value)}

    def table(self) -> str:
        """A text table: one row per term; value, weighted gradient norm per part, ratio to the task, cosine."""
        header = ["term", "weight", "value", *(f"|g| {part}" for part in [*self.parts, ALL]), "x task", "cos task",
                  "flags"]
        rows = [[f"{t.name}{' (task)' if t.task else ''}", _num(t.weight), _num(t.value),
                 *(_num(t.grad_norm[part]) for part in [*self.parts, ALL]), _num(t.ratio[ALL]),
                 _num(t.cos_task[ALL]), ", ".join(t.flags)] for t in self.terms]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                 for row in [header, *rows]]
        legend = (f"|g|: norm of the gradient of weight * term on the student's parameters; x task: |g| all over the "
                  f"task loss's ({' + '.join(self.task_terms) or 'none'})\nflags: dominates > {DOMINATES:g}x, "
                  f"vanishes < {VANISHES:g}x, fights: cos < {FIGHTS:g}")
        return "\n".join([*lines, legend])


def _num(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3g}"


def default_parts(names: Sequence[str]) -> dict[str, list[str]]:
    """Group parameter names by their first component (``visual``, ``encoder``, ``decoder``, ...), or by the first
    two, three ... components when fewer would give a single group (a student wrapping one ``model``)."""
    depth = max((name.count(".") + 1 for name in names), default=1)
    prefixes: list[str] = []
    for components in range(1, depth + 1):
        prefixes = list(dict.fromkeys(".".join(name.split(".")[:components]) for name in names))
        if len(prefixes) > 1:
            break
    return {prefix: [prefix] for prefix in prefixes}


def group_parameters(names: Sequence[str], parts: Parts | None = None) -> dict[str, list[int]]:
    """Indices of ``names`` per part; a parameter goes to the first part with a matching prefix (a whole
    dotted component: ``encoder`` matches ``encoder.rnn.weight``, not ``encoder2.weight``), unmatched ones to
    ``"other"``. ``parts=None``: :func:`default_parts`."""
    spec = default_parts(names) if parts is None else parts
    if ALL in spec:
        raise ValueError(f"a part may not be named {ALL!r}: that name stands for the whole student")
    groups: dict[str, list[int]] = {part: [] for part in spec}
    for index, name in enumerate(names):
        part = next((p for p, prefixes in spec.items() if any(_under(name, prefix) for prefix in prefixes)), "other")
        groups.setdefault(part, []).append(index)
    return {part: indices for part, indices in groups.items() if indices}


def _under(name: str, prefix: str) -> bool:
    prefix = prefix.rstrip(".")
    return name == prefix or name.startswith(prefix + ".")


def task_term_names(distiller: Distiller, task_terms: Sequence[str] | None = None) -> list[str]:
    """``task_terms`` checked against the distiller's terms, or by default every student-only term."""
    names = [loss.name for loss in distiller.terms]
    if task_terms is None:
        return [loss.name for loss in distiller.terms if loss.teacher_key is None]
    unknown = sorted(set(task_terms) - set(names))
    if unknown:
        raise ValueError(f"task_terms {unknown} are not loss terms; the terms are {names}")
    return list(task_terms)


@contextmanager
def preserved_state(module: nn.Module) -> Iterator[None]:
    """Run a block, then put back what a forward pass may change: the RNG states (torch on the CPU and on
    ``module``'s GPUs, Python's ``random``, NumPy's), every buffer of ``module`` (BatchNorm statistics, a loss's step
    counter) and the plain attributes of its submodules (rebound or added ones; containers mutated in place are not
    copied)."""
    buffers = [(buffer, buffer.detach().clone()) for buffer in module.buffers()]
    attributes = [(m, dict(vars(m))) for m in module.modules()]
    python_rng, numpy_rng = random.getstate(), np.random.get_state()
    gpus = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=gpus):
            yield
    finally:
        random.setstate(python_rng)
        np.random.set_state(numpy_rng)
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        for submodule, saved_vars in attributes:
            current = vars(submodule)
            for key in set(current) - set(saved_vars):
                del current[key]
            current.update(saved_vars)


def gradients(value: Tensor, params: Sequence[nn.Parameter]) -> list[Tensor | None]:
    """``d value / d param`` for each parameter, ``None`` where ``value`` does not reach it; the graph is kept."""
    if not value.requires_grad:
        return [None] * len(params)
    return list(torch.autograd.grad(value, list(params), retain_graph=True, allow_unused=True))


def diagnose(distiller: Distiller, batch: Batch, parts: Parts | None = None,
             task_terms: Sequence[str] | None = None) -> Diagnostics:
    """Measure every loss term of ``distiller`` on ``batch`` (already on the device, as the training step sees it).

    Args:
        distiller: the module; its student's trainable parameters are measured, in its current train/eval mode.
        batch: one batch.
        parts: ``{part: [parameter name prefixes]}`` relative to the student (``{"frontend": ["visual"], "encoder":
            ["encoder"], "head": ["decoder", "ctc_head"]}``); default: :func:`default_parts`.
        task_terms: names of the terms that make the task loss; default: the student-only terms.

    Returns:
        the :class:`Diagnostics`; nothing of the training state changes (see :func:`preserved_state`).
    """
    named = [(name, p) for name, p in distiller.student.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    groups = group_parameters([name for name, _ in named], parts)
    part_of = torch.zeros(len(params), dtype=torch.long)
    for part_index, indices in enumerate(groups.values()):
        part_of[indices] = part_index
    task_names = task_term_names(distiller, task_terms)
    with preserved_state(distiller), torch.enable_grad():
        _, values = distiller.losses_of(distiller.student(batch), batch)
        weighted = {loss.name: gradients(loss.weight * values[loss.name], params) for loss in distiller.terms
                    if loss.name in task_names}
        task = _sum_gradients([weighted[name] for name in task_names], len(params))
        reference = _TaskGradient(task, _dots(task, task), part_of, list(groups))
        terms = []
        for loss in distiller.terms:
            grads = weighted[loss.name] if loss.name in weighted else gradients(loss.weight * values[loss.name], params)
            terms.append(_term(loss.name, loss.weight, float(values[loss.name].detach()), loss.name in task_names,
                               grads, reference))
    task_norm = dict(zip([*groups, ALL], reference.per_part(reference.squares).sqrt().tolist(), strict=True))
    return Diagnostics(parts=list(groups), task_terms=task_names, task_grad_norm=task_norm, terms=terms)


def _sum_gradients(grads: Sequence[Sequence[Tensor | None]], count: int) -> list[Tensor | None]:
    total: list[Tensor | None] = [None] * count
    for term in grads:
        for index, grad in enumerate(term):
            if grad is not None:
                previous = total[index]
                total[index] = grad if previous is None else previous + grad
    return total


def _dots(grads: Sequence[Tensor | None], other: Sequence[Tensor | None]) -> Tensor:
    """Per parameter: the dot product of two gradients (0 where either is missing), in float64 on the CPU."""
    dots = [(g.float() * o.float()).sum().double() if g is not None and o is not None else None
            for g, o in zip(grads, other, strict=True)]
    present = [d for d in dots if d is not None]
    zero = present[0].new_zeros(()) if present else torch.zeros((), dtype=torch.float64)
    return torch.stack([zero if d is None else d for d in dots]).cpu() if dots else torch.zeros(0, dtype=torch.float64)


@dataclass(frozen=True)
class _TaskGradient:
    """The task loss's gradient per parameter, its squares, and the part index of each parameter."""

    grads: list[Tensor | None]
    squares: Tensor
    part_of: Tensor
    parts: list[str]

    def per_part(self, per_param: Tensor) -> Tensor:
        """Sums per part, then the total: one value per part and one for ``"all"``."""
        sums = torch.zeros(len(self.parts), dtype=per_param.dtype).index_add_(0, self.part_of, per_param)
        return torch.cat([sums, sums.sum().reshape(1)])


def _term(name: str, weight: float, value: float, task: bool, grads: Sequence[Tensor | None],
          reference: _TaskGradient) -> TermDiagnostics:
    squares = _dots(grads, grads)
    shared = torch.tensor([g is not None and t is not None for g, t in zip(grads, reference.grads, strict=True)],
                          dtype=torch.float64)
    norm, task_norm = reference.per_part(squares).sqrt(), reference.per_part(reference.squares).sqrt()
    dot = reference.per_part(_dots(grads, reference.grads))
    ratio = torch.where(task_norm > 0, norm / task_norm, math.nan)
    cosine = torch.where((norm > 0) & (task_norm > 0), dot / (norm * task_norm), math.nan)
    keys = [*reference.parts, ALL]
    return TermDiagnostics(
        name=name, weight=weight, value=value, task=task,
        grad_norm=dict(zip(keys, norm.tolist(), strict=True)), ratio=dict(zip(keys, ratio.tolist(), strict=True)),
        cos_task=dict(zip(keys, cosine.tolist(), strict=True)), shared_norm=math.sqrt(float((squares * shared).sum())),
        task_shared_norm=math.sqrt(float((reference.squares * shared).sum())),
    )


def auto_weights(diagnostics: Diagnostics, ratios: Mapping[str, float]) -> dict[str, float]:
    """New weights that put each distillation term's gradient norm at a stated multiple of the task loss's.

    Both norms are taken on the student's parameters that the term and the task loss both reach (a distillation
    term on a part the task never touches has nothing to be balanced against). This is a one-time rescaling of the
    measurement it is given, not a dynamic scheme: the ratios drift as training goes on.

    Args:
        diagnostics: a measurement (with the current weights).
        ratios: ``{"ratio": r}`` for every distillation term, and/or ``{term name: r}`` for one term.

    Returns:
        ``{term name: new weight}`` for every distillation term given a ratio (a term with no gradient on the shared
        parameters keeps its weight).
    """
    distill = [t for t in diagnostics.terms if not t.task]
    unknown = sorted(set(ratios) - {"ratio"} - {t.name for t in distill})
    if unknown:
        raise ValueError(f"auto_weight names {unknown}, which are not distillation terms ({[t.name for t in distill]})")
    if not diagnostics.task_terms:
        raise ValueError("auto_weight needs a task loss to scale against: no student-only term, and no task_terms")
    weights = {}
    for term in distill:
        ratio = ratios.get(term.name, ratios.get("ratio"))
        if ratio is None:
            continue
        scale = ratio * term.task_shared_norm / term.shared_norm if term.shared_norm > 0 else 1.0
        weights[term.name] = term.weight * scale
    return weights
