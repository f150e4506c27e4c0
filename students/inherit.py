"""TinyCLIP manual weight inheritance: a smaller open_clip CLIP initialised from slices of a teacher CLIP.

The student keeps a subset of each tower's residual blocks and the *leading* channels, heads, per-head dims and MLP
neurons of every kept parameter. With teacher width ``W``, ``H`` heads of ``d = W / H`` dims and MLP width ``M``, and
student ``w``, ``h`` heads of ``d' = w / h`` dims and MLP width ``m``::

    in_proj_weight  3W x W  -> view 3 x H x d x W   -> [:, :h, :d', :w]  -> 3w x w   (q, k, v sliced alike)
    out_proj.weight W x W   -> view W x H x d       -> [:w, :h, :d']     -> w x w
    mlp.c_fc        M x W   -> [:m, :w];  mlp.c_proj W x M -> [:w, :m]
    LayerNorms, conv1, class/positional/token embeddings: leading ``w`` channels
    proj / text_projection W x E -> [:w, :e]

With only layers dropped, every kept tensor equals the teacher's. :class:`InheritCLIPStudent` does this from a
teacher folder written by :func:`~xmodal.students.clip.save_open_clip_dir`, so a YAML recipe can start from it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import open_clip
import torch
from safetensors.torch import load_file
from torch import Tensor

from xmodal.modalities.image import OPENAI_MEAN, OPENAI_STD
from xmodal.students.clip import OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, CLIPStudent

LayerSelection = Literal["uniform", "first"]
TOWER_PREFIX = {"vision": "visual.transformer.resblocks", "text": "transformer.resblocks"}
_TOKENIZER_KEYS = ("hf_tokenizer_name", "tokenizer_kwargs", "tokenizer_mode")


def select_layers(n_teacher: int, layers: int | list[int], selection: LayerSelection = "uniform") -> list[int]:
    """Teacher block indices kept by the student.

    ``uniform`` spreads ``k`` layers evenly from the first to the last block (``round(linspace(0, L-1, k))``);
    ``first`` keeps blocks ``0..k-1``; an explicit list is kept as given (sorted, unique).
    """
    if isinstance(layers, list):
        idx = sorted(set(int(i) for i in layers))
    elif selection == "first":
        idx = list(range(layers))
    elif selection == "uniform":
        idx = [int(round(float(x))) for x in torch.linspace(0, n_teacher - 1, layers)] if layers > 1 else [0]
    else:
        raise ValueError(f"unknown layer_selection {selection!r}; use 'uniform' or 'first'")
    if not idx or idx[0] < 0 or idx[-1] >= n_teacher or len(set(idx)) != len(idx):
        raise ValueError(f"cannot keep layers {layers!r} of a {n_teacher}-layer tower")
    return idx


def clip_config(model: open_clip.CLIP | CLIPStudent) -> dict[str, Any]:
    """``{"embed_dim", "vision_cfg", "text_cfg"}`` of a standard ViT/transformer CLIP, read from a student or inferred
    from the module shapes of a plain ``open_clip.CLIP``."""
    if isinstance(model, CLIPStudent):
        cfg = json.loads(json.dumps(model.model_cfg))
        for key in _TOKENIZER_KEYS:
            cfg["text_cfg"].pop(key, None)
        return cfg
    visual = model.visual
    if not isinstance(visual, open_clip.transformer.VisionTransformer) or visual.attn_pool is not None:
        raise TypeError("weight inheritance supports open_clip ViT towers without attentional pooling")
    vblock, tblock = visual.transformer.resblocks[0], model.transformer.resblocks[0]
    vwidth, twidth = visual.conv1.out_channels, model.token_embedding.weight.shape[1]
    vision_cfg = {"image_size": visual.image_size[0], "patch_size": visual.patch_size[0], "width": vwidth,
                  "layers": len(visual.transformer.resblocks), "head_width": vwidth // vblock.attn.num_heads,
                  "mlp_ratio": vblock.mlp.c_fc.out_features / vwidth, "pool_type": visual.pool_type,
                  "final_ln_after_pool": visual.final_ln_after_pool}
    text_cfg = {"context_length": model.context_length, "vocab_size": model.vocab_size, "width": twidth,
                "heads": tblock.attn.num_heads, "layers": len(model.transformer.resblocks),
                "mlp_ratio": tblock.mlp.c_fc.out_features / twidth, "pool_type": model.text_pool_type,
                "eos_id": model.text_eos_id, "no_causal_mask": model.attn_mask is None}
    return {"embed_dim": int(visual.proj.shape[1]), "vision_cfg": vision_cfg, "text_cfg": text_cfg}


def tower_dims(cfg: dict[str, Any], tower: str) -> tuple[int, int, int, int]:
    """``(layers, width, heads, mlp_width)`` of ``cfg['vision_cfg']`` or ``cfg['text_cfg']`` as open_clip builds it."""
    sub = cfg[f"{tower}_cfg"]
    width = int(sub["width"])
    heads = width // int(sub.get("head_width", 64)) if tower == "vision" else int(sub.get("heads", 8))
    return int(sub.get("layers", 12)), width, heads, int(width * float(sub.get("mlp_ratio", 4.0)))


def mlp_ratio_for(width: int, mlp_width: int) -> float:
    """A ``mlp_ratio`` for which open_clip's ``int(width * mlp_ratio)`` is exactly ``mlp_width``."""
    ratio = mlp_width / width
    return ratio if int(width * ratio) == mlp_width else (mlp_width + 0.5) / width


def _slice_block(sd: dict[str, Tensor], src: str, dst: str, t: tuple[int, int, int], s: tuple[int, int, int],
                 out: dict[str, Tensor]) -> None:
    """Copy block ``src`` to ``dst`` keeping leading channels; ``t``/``s``: (width, heads, mlp) of teacher/student."""
    (tw, th, _), (w, h, m) = t, s
    td, d = tw // th, w // h
    for ln in ("ln_1", "ln_2"):
        for p in ("weight", "bias"):
            out[f"{dst}.{ln}.{p}"] = sd[f"{src}.{ln}.{p}"][:w]
    out[f"{dst}.attn.in_proj_weight"] = sd[f"{src}.attn.in_proj_weight"].view(3, th, td, tw)[:, :h, :d, :w].reshape(
        3 * w, w)
    out[f"{dst}.attn.in_proj_bias"] = sd[f"{src}.attn.in_proj_bias"].view(3, th, td)[:, :h, :d].reshape(3 * w)
    out[f"{dst}.attn.out_proj.weight"] = sd[f"{src}.attn.out_proj.weight"].view(tw, th, td)[:w, :h, :d].reshape(w, w)
    out[f"{dst}.attn.out_proj.bias"] = sd[f"{src}.attn.out_proj.bias"][:w]
    out[f"{dst}.mlp.c_fc.weight"] = sd[f"{src}.mlp.c_fc.weight"][:m, :w]
    out[f"{dst}.mlp.c_fc.bias"] = sd[f"{src}.mlp.c_fc.bias"][:m]
    out[f"{dst}.mlp.c_proj.weight"] = sd[f"{src}.mlp.c_proj.weight"][:w, :m]
    out[f"{dst}.mlp.c_proj.bias"] = sd[f"{src}.mlp.c_proj.bias"][:w]


def _student_tower(cfg: dict[str, Any], tower: str, layers: int, width: int | None, heads: int | None,
                   mlp_width: int | None) -> tuple[dict[str, Any], tuple[int, int, int]]:
    """The student tower config and its (width, heads, mlp width); defaults keep the teacher's head dim and ratio."""
    _, tw, th, tm = tower_dims(cfg, tower)
    w = width or tw
    h = heads or (th if w == tw else max(1, w // (tw // th)))
    m = mlp_width or int(round(w * tm / tw))
    if w > tw or h > th or m > tm or w % h or w // h > tw // th:
        raise ValueError(f"{tower}: cannot inherit width {w}, {h} heads, mlp {m} from width {tw}, {th} heads, mlp {tm}")
    sub = dict(cfg[f"{tower}_cfg"], width=w, layers=layers, mlp_ratio=mlp_ratio_for(w, m))
    if tower == "vision":
        sub["head_width"] = w // h
    else:
        sub["heads"] = h
    return sub, (w, h, m)


def inherit_clip(
    teacher: open_clip.CLIP | CLIPStudent,
    *,
    vision_layers: int | list[int],
    text_layers: int | list[int],
    vision_width: int | None = None,
    text_width: int | None = None,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    vision_mlp_width: int | None = None,
    text_mlp_width: int | None = None,
    embed_dim: int | None = None,
    layer_selection: LayerSelection = "uniform",
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Config and state dict of a smaller CLIP inheriting the teacher's layers and leading channels.

    Args:
        teacher: an ``open_clip.CLIP`` (ViT image tower) or a :class:`CLIPStudent`.
        vision_layers, text_layers: number of blocks to keep (see :func:`select_layers`) or explicit indices.
        vision_width, text_width: residual widths ``w`` (default: the teacher's).
        vision_heads, text_heads: heads ``h`` (default: the teacher's at full width, else ``w / teacher head dim``).
        vision_mlp_width, text_mlp_width: MLP hidden sizes (default: the teacher's ratio times ``w``).
        embed_dim: joint embedding size ``e`` (default: the teacher's); projections keep their leading columns.
        layer_selection: ``"uniform"`` or ``"first"`` for integer layer counts.

    Returns:
        ``({"embed_dim", "vision_cfg", "text_cfg"}, state_dict)``; the state dict loads strictly into
        ``open_clip.CLIP(**config)`` (and into ``CLIPStudent(...).model``).
    """
    model = teacher.model if isinstance(teacher, CLIPStudent) else teacher
    cfg = clip_config(teacher)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    e = embed_dim or int(cfg["embed_dim"])
    vidx = select_layers(tower_dims(cfg, "vision")[0], vision_layers, layer_selection)
    tidx = select_layers(tower_dims(cfg, "text")[0], text_layers, layer_selection)
    vcfg, vs = _student_tower(cfg, "vision", len(vidx), vision_width, vision_heads, vision_mlp_width)
    tcfg, ts = _student_tower(cfg, "text", len(tidx), text_width, text_heads, text_mlp_width)
    out: dict[str, Tensor] = {"logit_scale": sd["logit_scale"]}
    if "logit_bias" in sd:
        out["logit_bias"] = sd["logit_bias"]
    vw, tw = vs[0], ts[0]
    out["visual.conv1.weight"] = sd["visual.conv1.weight"][:vw]
    out["visual.class_embedding"] = sd["visual.class_embedding"][:vw]
    out["visual.positional_embedding"] = sd["visual.positional_embedding"][:, :vw]
    for ln in ("ln_pre", "ln_post"):
        for p in ("weight", "bias"):
            if f"visual.{ln}.{p}" in sd:
                out[f"visual.{ln}.{p}"] = sd[f"visual.{ln}.{p}"][:vw]
    out["visual.proj"] = sd["visual.proj"][:vw, :e]
    out["token_embedding.weight"] = sd["token_embedding.weight"][:, :tw]
    out["positional_embedding"] = sd["positional_embedding"][:, :tw]
    out["ln_final.weight"], out["ln_final.bias"] = sd["ln_final.weight"][:tw], sd["ln_final.bias"][:tw]
    out["text_projection"] = sd["text_projection"][:tw, :e]
    for tower, idx, s in (("vision", vidx, vs), ("text", tidx, ts)):
        _, twidth, theads, tmlp = tower_dims(cfg, tower)
        for j, i in enumerate(idx):
            prefix = TOWER_PREFIX[tower]
            _slice_block(sd, f"{prefix}.{i}", f"{prefix}.{j}", (twidth, theads, tmlp), s, out)
    config = {"embed_dim": e, "vision_cfg": vcfg, "text_cfg": tcfg}
    return config, {k: v.contiguous() for k, v in out.items()}


def read_open_clip_dir(folder: str | Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Tensor]]:
    """``(model_cfg, preprocess_cfg, state_dict)`` of a folder written by ``save_open_clip_dir``."""
    folder = Path(folder)
    config = json.loads((folder / OPEN_CLIP_CONFIG).read_text())
    model_cfg = config["model_cfg"]
    for key in _TOKENIZER_KEYS:
        model_cfg["text_cfg"].pop(key, None)
    return model_cfg, config.get("preprocess_cfg", {}), load_file(str(folder / OPEN_CLIP_WEIGHTS))


class InheritCLIPStudent(CLIPStudent):
    """A :class:`CLIPStudent` initialised by :func:`inherit_clip` from a teacher's open_clip folder.

    Its ``init_args`` are those of the plain :class:`CLIPStudent` it builds, and ``zoo_class_path`` names that class,
    so an exported checkpoint reloads without the teacher.

    Args:
        teacher_dir: a folder written by ``save_open_clip_dir`` (``open_clip_config.json`` + weights + tokenizer).
        tokenizer: the student's tokenizer folder or name (default: ``teacher_dir``, which holds the teacher's
            tokenizer files; pass the tokenizer folder itself to keep exported checkpoints small).
        vision_layers, text_layers: as :func:`inherit_clip`; ``None`` keeps every block.
        Other args: as :func:`inherit_clip`.
    """

    zoo_class_path = "xmodal.students.clip.CLIPStudent"

    def __init__(
        self,
        teacher_dir: str,
        vision_layers: int | list[int] | None = None,
        text_layers: int | list[int] | None = None,
        vision_width: int | None = None,
        text_width: int | None = None,
        vision_heads: int | None = None,
        text_heads: int | None = None,
        vision_mlp_width: int | None = None,
        text_mlp_width: int | None = None,
        embed_dim: int | None = None,
        layer_selection: LayerSelection = "uniform",
        tokenizer: str | None = None,
    ) -> None:
        model_cfg, preprocess, state = read_open_clip_dir(teacher_dir)
        teacher = open_clip.CLIP(**model_cfg)
        teacher.load_state_dict(state, strict=True)
        cfg, inherited = inherit_clip(
            teacher, vision_layers=vision_layers or tower_dims(model_cfg, "vision")[0],
            text_layers=text_layers or tower_dims(model_cfg, "text")[0], vision_width=vision_width,
            text_width=text_width, vision_heads=vision_heads, text_heads=text_heads,
            vision_mlp_width=vision_mlp_width, text_mlp_width=text_mlp_width, embed_dim=embed_dim,
            layer_selection=layer_selection,
        )
        cfg["text_cfg"]["vocab_size"] = model_cfg["text_cfg"]["vocab_size"]
        super().__init__(
            cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], tokenizer=tokenizer or str(teacher_dir),
            mean=tuple(preprocess.get("mean", OPENAI_MEAN)), std=tuple(preprocess.get("std", OPENAI_STD)),
            init_logit_scale=float(inherited["logit_scale"]),
        )
        with torch.no_grad():
            self.model.load_state_dict(inherited, strict=True)
