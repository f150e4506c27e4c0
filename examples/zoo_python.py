"""Use a trained model from Python: register its folder in the zoo, load it by name and classify an image.

Run ``examples/train_cli.py`` first (it exports ``runs/examples/model``), or pass any exported CLIP folder.
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

import xmodal


def first_test_image(shards: Path) -> tuple[Image.Image, int]:
    """The first image of the first test shard and its label (a WebDataset shard is a plain tar)."""
    with tarfile.open(sorted(shards.glob("test-*.tar"))[0]) as tar:
        names = tar.getnames()
        image_name = next(n for n in names if n.endswith((".png", ".jpg")))
        key = image_name.rsplit(".", 1)[0]
        image = Image.open(io.BytesIO(tar.extractfile(image_name).read())).convert("RGB")  # type: ignore[union-attr]
        label = json.loads(tar.extractfile(f"{key}.json").read())["label"]  # type: ignore[union-attr]
    return image, int(label)


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("runs/examples/model"), help="an exported model folder")
    parser.add_argument("--data", type=Path, default=Path("runs/examples/shapes"), help="the shapes corpus")
    parser.add_argument("--name", default="tiny-clip-example", help="the zoo name to register it under")
    args = parser.parse_args(argv)

    xmodal.register_model(args.model, args.name)  # copies the weights into the user zoo, checked by sha256
    print("zoo:", xmodal.list_models())
    model: Any = xmodal.create_model(args.name)  # eval mode, like timm and open_clip
    classes = json.loads((args.data / "classes.json").read_text())
    names = classes["classes"] if isinstance(classes, dict) else classes
    image, label = first_test_image(args.data)
    with torch.no_grad():
        image_emb = model.embed_images(pil_to_tensor(image)[None].float() / 255)  # raw [0, 1] pixels
        text_emb = model.embed_texts([f"a photo of a {name}" for name in names])
        probabilities = (100 * image_emb @ text_emb.T).softmax(dim=-1)[0]
    predicted = int(probabilities.argmax())
    return {"true": names[label], "predicted": names[predicted], "probability": float(probabilities[predicted])}


if __name__ == "__main__":
    print(run())
