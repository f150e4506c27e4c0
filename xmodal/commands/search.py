"""``xmodal search-student``: rank candidate students for a teacher without training (DisWOT, :mod:`xmodal.search`)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xmodal.sources import module_constant, module_docstring


def search_main(argv: Sequence[str]) -> list[dict[str, Any]]:
    """``xmodal search-student``: rank candidate students for a teacher without training; print a table."""
    doc = module_docstring("xmodal.search")  # read, not imported: `--help` needs no torch
    summary = doc.split("\n\n")[0] if doc else ""
    candidates_format = module_constant("xmodal.search", "CANDIDATES_FORMAT")
    parser = argparse.ArgumentParser(prog="xmodal search-student", description=summary,
                                     epilog="candidates file format:\n" + candidates_format,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", help="teacher YAML spec (class_path/init_args/checkpoint), zoo name or folder")
    parser.add_argument("--candidates", required=True, help="YAML file with a 'candidates' list")
    parser.add_argument("--data", required=True, help="image shard pattern (brace/glob), labels from .json 'label'")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-batches", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="seed set before building each candidate")
    parser.add_argument("--logits-key", default=None, help="output key of the logits for models returning dicts")
    parser.add_argument("--input-key", default="image", help="batch key fed to plain image models")
    parser.add_argument("--device")  # default: cuda when available, decided after parsing (it needs torch)
    parser.add_argument("--out", default=None, help="write the ranking as JSON here")
    args = parser.parse_args(list(argv))
    import torch
    import yaml

    from xmodal.contracts import count_params
    from xmodal.data.wds import move_batch
    from xmodal.plugins import load_plugins
    from xmodal.search import load_candidates, load_image_batches, load_teacher, markdown_ranking, rank_students

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    load_plugins()  # candidates and teacher may name xmodal's and third-party plug-ins by short class name
    path = Path(args.candidates)
    config = yaml.safe_load(path.read_text()) or {}
    teacher = load_teacher(args.teacher, config, path.parent).to(args.device)
    candidates = {n: m.to(args.device) for n, m in load_candidates(config, path.parent, args.seed).items()}
    batches = load_image_batches(args.data, args.image_size, args.batch_size, args.num_batches)
    batches = [move_batch(b, args.device) for b in batches]
    ranking = rank_students(teacher, candidates, batches, args.num_batches, args.logits_key, args.input_key)
    rows = [{"rank": i + 1, "name": name, "score": score, "params": count_params(candidates[name])}
            for i, (name, score) in enumerate(ranking)]
    print(markdown_ranking(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return rows
