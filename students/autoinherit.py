"""TinyCLIP automatic weight inheritance: hard-concrete (L0) gates over layers, MLP neurons and heads, then pruning.

Each gate ``z`` follows the hard-concrete distribution (Louizos et al. 2018) with ``l = -0.1``, ``r = 1.1``,
``beta = 2/3``: in training ``u ~ U(0, 1)``, ``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)``,
``z = clamp(s (r - l) + l, 0, 1)``; ``P(z != 0) = sigmoid(log_alpha - beta log(-l / r))``.

Gates per tower (``L`` blocks, ``H`` heads of ``d`` dims, width ``W``, MLP width ``M``): one per block (scales both
residual branches), one per MLP neuron (``L x M``), and optionally one per head (``L x H``). The expected kept
fraction of the prunable parameters (heads: ``4 W d + 3 d`` each, neurons: ``2 W + 1`` each) is::

    s = sum_l p_l (sum_h p_lh c_head + sum_n p_ln c_neuron) / sum_l (H c_head + M c_neuron)

Deterministic (eval) gates, chosen so that :func:`prune` gives an open_clip model with the *same* function:
blocks with ``z_l > 0`` are kept (at least one per tower); every kept block keeps the same number ``k`` of MLP
neurons, ``k = round(mean_l #{n: z_ln > 0})`` over kept blocks, its top-``k`` by ``log_alpha`` (open_clip needs
one MLP width per tower);
gate values are folded into ``c_proj`` and ``out_proj``. open_clip's attention ties its inner size to the residual
width, so heads cannot be removed physically without changing the width: head gates (off by default) are folded
into ``out_proj`` (a zero gate zeroes the head's columns exactly) but the head stays in the tensor shapes.
"""

from __future__ import annotations

import math
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmodal.contracts import Batch, Outputs
from xmodal.modalities.text import tokens_for
from xmodal.students.clip import CLIPStudent
from xmodal.students.inherit import TOWER_PREFIX, clip_config, mlp_ratio_for, tower_dims

LIMIT_L, LIMIT_R, BETA = -0.1, 1.1, 2.0 / 3.0


class HardConcreteGate(nn.Module):
    """A tensor of hard-concrete gates with learnable ``log_alpha ~ N(logit(init_keep), init_noise^2)``."""

    def __init__(self, shape: tuple[int, ...], init_keep: float = 0.95, init_noise: float = 0.0) -> None:
        super().__init__()
        mean = math.log(init_keep / (1 - init_keep))
        self.log_alpha = nn.Parameter(mean + init_noise * torch.randn(shape))

    def prob_nonzero(self) -> Tensor:
        """``P(z != 0) = sigmoid(log_alpha - beta log(-l / r))``, same shape as the gates."""
        return torch.sigmoid(self.log_alpha - BETA * math.log(-LIMIT_L / LIMIT_R))

    def sample(self) -> Tensor:
        """A reparameterised sample ``z`` in [0, 1]."""
        u = torch.rand_like(self.log_alpha).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + self.log_alpha) / BETA)
        return (s * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(0, 1)

    def deterministic(self) -> Tensor:
        """The noise-free gate ``clamp(sigmoid(log_alpha) (r - l) + l, 0, 1)``."""
        return (torch.sigmoid(self.log_alpha) * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(0, 1)


def top_k(gate: HardConcreteGate, k: int) -> tuple[Tensor, Tensor]:
    """Each row's top-``k`` units by ``log_alpha`` (``L x k``, sorted) and the deterministic gates (``L x N``) with
    every other unit set to 0."""
    idx = gate.log_alpha.topk(k, dim=1).indices.sort(dim=1).values
    keep = torch.zeros_like(gate.log_alpha, dtype=torch.bool).scatter_(1, idx, True)
    return idx, gate.deterministic() * keep


class TowerGates(nn.Module):
    """The gates of one tower: ``layer`` (``L``), ``mlp`` (``L x M``) and, if enabled, ``head`` (``L x H``)."""

    def __init__(self, layers: int, width: int, heads: int, mlp: int, gate_heads: bool, init_keep: float,
                 init_noise: float = 0.0, min_layers: int = 1) -> None:
        super().__init__()
        if not 0 <= min_layers <= layers:
            raise ValueError(f"min_layers must be in [0, {layers}], got {min_layers}")
        self.width, self.heads, self.mlp_width, self.head_dim = width, heads, mlp, width // heads
        self.min_layers = min_layers
        self.layer = HardConcreteGate((layers,), init_keep, init_noise)
        self.mlp = HardConcreteGate((layers, mlp), init_keep, init_noise)
        self.head = HardConcreteGate((layers, heads), init_keep, init_noise) if gate_heads else None

    def cost(self) -> tuple[float, float]:
        """Parameters of one head and of one MLP neuron."""
        return 4 * self.width * self.head_dim + 3 * self.head_dim, 2 * self.width + 1

    def floor(self) -> Tensor:
        """``L``: 1 at the ``min_layers`` blocks with the highest ``log_alpha``, else 0. Their layer gates never go
        below 1. A tower with every block gated off pools the same token whatever its input: the CLIP loss sits at
        ``ln(batch)`` and no task gradient reaches the closed gates (the automatic-inheritance collapse seen on
        digits), so at least one block always stays."""
        log_alpha = self.layer.log_alpha.detach()
        best = log_alpha.topk(self.min_layers).indices
        return torch.zeros_like(log_alpha).scatter(0, best, 1.0)

    def expected_kept(self) -> tuple[Tensor, float]:
        """``(expected kept prunable params, total prunable params)``; differentiable in the first."""
        c_head, c_neuron = self.cost()
        p_layer, p_mlp = torch.maximum(self.layer.prob_nonzero(), self.floor()), self.mlp.prob_nonzero()
        heads = self.head.prob_nonzero().sum(1) if self.head is not None else torch.full_like(p_layer, self.heads)
        kept = (p_layer * (heads * c_head + p_mlp.sum(1) * c_neuron)).sum()
        return kept, float(p_layer.numel() * (self.heads * c_head + self.mlp_width * c_neuron))

    def masks(self, training: bool) -> dict[str, Tensor]:
        """Sampled (training) or structured deterministic (eval) gate values: ``layer``, ``mlp``, ``head``; in eval
        also ``mlp_idx`` (``L x k``), the MLP neurons that :func:`prune` keeps in every block."""
        ones = torch.ones(self.layer.log_alpha.shape[0], self.heads, device=self.layer.log_alpha.device)
        if training:
            head = self.head.sample() if self.head is not None else ones
            return {"layer": torch.maximum(self.layer.sample(), self.floor()), "mlp": self.mlp.sample(), "head": head}
        layer = torch.maximum(self.layer.deterministic(), self.floor())
        kept = self.kept_layers(layer)  # min_layers=0 and every gate 0: the best block is kept as a no-op (gate 0)
        k_mlp = max(1, int(round(float((self.mlp.deterministic()[kept] > 0).sum(1).float().mean()))))
        mlp_idx, mlp = top_k(self.mlp, k_mlp)
        head = ones if self.head is None else self.head.deterministic()
        return {"layer": layer, "mlp": mlp, "head": head, "mlp_idx": mlp_idx}

    def kept_layers(self, layer: Tensor) -> list[int]:
        """Indices of the blocks kept by the deterministic layer gates (at least the best-scored one)."""
        kept = [i for i in range(layer.numel()) if float(layer[i]) > 0]
        return kept or [int(self.layer.log_alpha.argmax())]


def prunable_params(cfg: dict[str, Any]) -> int:
    """Parameters of the heads and MLP neurons of both towers of a CLIP config (what the gates can remove)."""
    total = 0
    for tower in ("vision", "text"):
        layers, width, heads, mlp = tower_dims(cfg, tower)
        total += layers * (heads * (4 * width * (width // heads) + 3 * (width // heads)) + mlp * (2 * width + 1))
    return total


def gated_attention(attn: nn.MultiheadAttention, x: Tensor, mask: Tensor | None, head: Tensor) -> Tensor:
    """``nn.MultiheadAttention`` self-attention (batch first) with per-head output gates ``head`` (``H``).

    ``B x N x W -> B x N x W``: ``out_proj(concat_h(head_h * softmax(q_h k_h^T / sqrt(d) + mask) v_h))``.
    """
    b, n, w = x.shape
    h = attn.num_heads
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).view(b, n, 3, h, w // h).permute(2, 0, 3, 1, 4)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask) * head.view(1, h, 1, 1)
    return attn.out_proj(o.transpose(1, 2).reshape(b, n, w))


def gated_block(block: Any, x: Tensor, mask: Tensor | None, layer: Tensor, mlp: Tensor, head: Tensor) -> Tensor:
    """An open_clip ``ResidualAttentionBlock`` with gates: ``x + z_l attn(ln_1 x)``, then ``+ z_l mlp(ln_2 x)``
    where the MLP's hidden units are multiplied by ``mlp`` (``M``)."""
    x = x + layer * gated_attention(block.attn, block.ln_1(x), mask, head)
    hidden = block.mlp.gelu(block.mlp.c_fc(block.ln_2(x))) * mlp
    return x + layer * block.mlp.c_proj(hidden)


class MaskedCLIP(nn.Module):
    """A :class:`CLIPStudent` under hard-concrete gates; outputs the student's keys plus ``sparsity.expected``.

    Args:
        student: the CLIP to prune (for instance an :class:`~xmodal.students.inherit.InheritCLIPStudent`).
        gate_heads: also gate attention heads (folded, not removed, by :func:`prune`; see the module docstring).
        init_keep: initial ``sigmoid(log_alpha)`` of every gate (0.95: the deterministic gates start at 1).
        init_noise: standard deviation of Gaussian noise added to the initial ``log_alpha`` (CoFi uses 0.01).
        min_layers: blocks per tower that are never gated off (the best-scored ones; see :meth:`TowerGates.floor`).
    """

    output_keys = ("image.emb", "text.emb", "logit_scale", "sparsity.expected")

    def __init__(self, student: CLIPStudent, gate_heads: bool = False, init_keep: float = 0.95,
                 init_noise: float = 0.0, min_layers: int = 1) -> None:
        super().__init__()
        self.student = student
        cfg = clip_config(student)
        self.gates = nn.ModuleDict()
        for tower in ("vision", "text"):
            layers, width, heads, mlp = tower_dims(cfg, tower)
            self.gates[tower] = TowerGates(layers, width, heads, mlp, gate_heads, init_keep, init_noise, min_layers)
        for block in [*student.model.visual.transformer.resblocks, *student.model.transformer.resblocks]:
            if not isinstance(block.ls_1, nn.Identity) or not isinstance(block.ls_2, nn.Identity):
                raise TypeError("MaskedCLIP supports open_clip's default residual blocks without layer scale")

    def expected_sparsity(self) -> Tensor:
        """Expected kept fraction of the prunable parameters of both towers (scalar, differentiable)."""
        kept = [gates.expected_kept() for gates in self.gates.values()]  # type: ignore[operator]
        return sum(k for k, _ in kept) / sum(t for _, t in kept)  # type: ignore[return-value]

    def tower_masks(self, tower: str) -> dict[str, Tensor]:
        return self.gates[tower].masks(self.training)  # type: ignore[operator]

    def encode_image(self, image: Tensor, normalize: bool = False) -> Tensor:
        """Gated image tower, as ``open_clip.CLIP.encode_image``: normalised ``B x 3 x H x W`` -> ``B x E``."""
        visual = self.student.model.visual
        x = visual._embeds(image)
        m = self.tower_masks("vision")
        for i, block in enumerate(visual.transformer.resblocks):
            x = gated_block(block, x, None, m["layer"][i], m["mlp"][i], m["head"][i])
        pooled, _ = visual._pool(x)
        features = pooled @ visual.proj
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: Tensor, normalize: bool = False) -> Tensor:
        """Gated text tower, as ``open_clip.CLIP.encode_text``: token ids ``B x L`` -> ``B x E``."""
        model = self.student.model
        tokens = text.to(model.logit_scale.device)
        x = model.token_embedding(tokens) + model.positional_embedding
        m = self.tower_masks("text")
        mask = model.attn_mask.to(x.dtype) if model.attn_mask is not None else None
        for i, block in enumerate(model.transformer.resblocks):
            x = gated_block(block, x, mask, m["layer"][i], m["mlp"][i], m["head"][i])
        x = open_clip.transformer.text_global_pool(model.ln_final(x), tokens, model.text_pool_type,
                                                   eos_token_id=model.text_eos_id)
        features = x @ model.text_projection
        return F.normalize(features, dim=-1) if normalize else features

    def embed_images(self, images: Tensor) -> Tensor:
        """Raw float ``B x 3 x H x W`` in [0, 1] (or uint8) -> L2-normalised ``B x E``."""
        return self.encode_image(self.student.normalize(images), normalize=True)

    def embed_texts(self, captions: list[str]) -> Tensor:
        """``B`` strings -> L2-normalised ``B x E``."""
        return self.encode_text(self.student.tokenizer(captions), normalize=True)

    def forward(self, batch: Batch) -> Outputs:
        out: Outputs = {"logit_scale": self.student.model.logit_scale.exp(),
                        "sparsity.expected": self.expected_sparsity()}
        if "image" in batch:
            out["image.emb"] = self.embed_images(batch["image"])
        if "caption" in batch:
            tokens = tokens_for(batch, self.student.tokenizer_name, self.student.tokenizer,
                                self.student.model.logit_scale.device)
            out["text.emb"] = self.encode_text(tokens, normalize=True)
        return out


def _prune_tower(sd: dict[str, Tensor], out: dict[str, Tensor], prefix: str, m: dict[str, Tensor],
                 kept: list[int], head_dim: int) -> int:
    """Copy the kept blocks of one tower into ``out`` with gates folded in; returns the common MLP width."""
    for j, i in enumerate(kept):
        src, dst, zl = f"{prefix}.{i}", f"{prefix}.{j}", m["layer"][i]
        idx = m["mlp_idx"][i]
        for key, value in sd.items():
            if key.startswith(src + "."):
                out[dst + key[len(src):]] = value
        head_scale = m["head"][i].repeat_interleave(head_dim)
        out[f"{dst}.attn.out_proj.weight"] = sd[f"{src}.attn.out_proj.weight"] * head_scale * zl
        out[f"{dst}.attn.out_proj.bias"] = sd[f"{src}.attn.out_proj.bias"] * zl
        out[f"{dst}.mlp.c_fc.weight"] = sd[f"{src}.mlp.c_fc.weight"][idx]
        out[f"{dst}.mlp.c_fc.bias"] = sd[f"{src}.mlp.c_fc.bias"][idx]
        out[f"{dst}.mlp.c_proj.weight"] = sd[f"{src}.mlp.c_proj.weight"][:, idx] * m["mlp"][i][idx] * zl
        out[f"{dst}.mlp.c_proj.bias"] = sd[f"{src}.mlp.c_proj.bias"] * zl
    return int(out[f"{prefix}.0.mlp.c_fc.bias"].numel())


@torch.no_grad()
def prune(masked: MaskedCLIP) -> CLIPStudent:
    """Apply the deterministic gates and remove the gated-off blocks and MLP neurons.

    Returns:
        A plain :class:`CLIPStudent` (open_clip layout) whose outputs equal ``masked.eval()``'s.
    """
    was_training = masked.training
    masked.eval()
    student = masked.student
    sd = {k: v.detach().clone() for k, v in student.model.state_dict().items()}
    out = {k: v for k, v in sd.items() if not any(k.startswith(p + ".") for p in TOWER_PREFIX.values())}
    args: dict[str, Any] = {k: v for k, v in student.init_args.items()}
    for tower, prefix in TOWER_PREFIX.items():
        gates: TowerGates = masked.gates[tower]  # type: ignore[assignment]
        m = gates.masks(False)
        kept = gates.kept_layers(m["layer"])
        mlp = _prune_tower(sd, out, prefix, m, kept, gates.head_dim)
        cfg = dict(args[f"{tower}_cfg"], layers=len(kept), mlp_ratio=mlp_ratio_for(gates.width, mlp))
        args[f"{tower}_cfg"] = cfg
    pruned = CLIPStudent(**args).to(student.model.logit_scale.device)
    pruned.model.load_state_dict(out, strict=True)
    masked.train(was_training)
    return pruned

