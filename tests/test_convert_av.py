"""``xmodal data convert lrs2|lrs3|grid|cmlr``: miniatures of each dataset's layout, converted, decoded back and
trained on for one step; missing, corrupt and malformed sources."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import soundfile as sf
import webdataset as wds

from tests.conftest import ROOT
from xmodal.commands.data import data_main
from xmodal.data.convert import avspeech
from xmodal.data.convert.base import ConvertError, SkipSample
from xmodal.modalities.audio import decode_audio
from xmodal.modalities.video import decode_video

RED, BLUE = (220, 30, 30), (30, 30, 220)
RATE = 16000


def write_clip(path: Path, frames: np.ndarray, fps: int = 25, seconds: float | None = 0.6,
               video_codec: str = "mpeg4", audio_codec: str = "aac") -> None:
    """A video file with PyAV: ``frames`` (``T x H x W x 3``) and, unless ``seconds`` is None, a 440 Hz tone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        video = container.add_stream(video_codec, rate=fps)
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        audio = container.add_stream(audio_codec, rate=RATE) if seconds else None
        if audio is not None:
            audio.layout = "mono"
        for index, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts = index
            container.mux(video.encode(frame))
        container.mux(video.encode())
        if audio is not None and seconds:
            _mux_tone(container, audio, seconds)


def _mux_tone(container: Any, audio: Any, seconds: float) -> None:
    fmt, size = audio.codec_context.format.name, audio.codec_context.frame_size or 1024
    wave = 0.3 * np.sin(np.arange(int(seconds * RATE)) / RATE * 2 * np.pi * 440)
    pcm = (wave * 32767).astype(np.int16) if fmt.startswith("s16") else wave.astype(np.float32)
    for start in range(0, len(pcm), size):
        chunk = np.pad(pcm[start:start + size], (0, max(0, start + size - len(pcm))))
        frame = av.AudioFrame.from_ndarray(chunk[None], format=fmt, layout="mono")
        frame.sample_rate, frame.pts = RATE, start
        container.mux(audio.encode(frame))
    container.mux(audio.encode())


def face_frames(count: int = 15, size: int = 160) -> np.ndarray:
    """Blue frames whose lrs2-mouth region (x 20-80%, y 40-100%) is red."""
    frames = np.empty((count, size, size, 3), np.uint8)
    frames[:] = BLUE
    frames[:, int(0.4 * size):, int(0.2 * size):int(0.8 * size)] = RED
    return frames


def read_shards(pattern: Path) -> list[dict[str, Any]]:
    return list(wds.WebDataset(str(pattern), shardshuffle=False, empty_check=False))


def convert(fmt: str, src: Path, out: Path, *extra: str) -> dict[str, Any]:
    data_main(["convert", fmt, str(src), "--out", str(out), "--workers", "1", "--shard-size", "2", *extra])
    return json.loads((out / "manifest.json").read_text())


# --------------------------------------------------------------------------------------------------- LRS2 / LRS3


def make_lrs2(root: Path) -> Path:
    """LRS2: split lists with flags, main/<video>/<clip>.mp4 + .txt; one missing, one corrupt, one malformed."""
    lists = {"train": ["6330311066473698535/00011", "6330311066473698535/00012", "6331559613336179781/00002",
                       "6331559613336179781/00003"],
             "val": ["6339356267468615354/00010"], "test": ["6343252661930009508/00001 NF"]}
    for split, ids in lists.items():
        (root / f"{split}.txt").parent.mkdir(parents=True, exist_ok=True)
        (root / f"{split}.txt").write_text("\n".join(ids) + "\n")
    texts = {"6330311066473698535/00011": "Text:  WHEN YOU'RE COOKING CHIPS AT HOME\nConf:  4\n",
             "6330311066473698535/00012": "Text:  THE 2 OF THEM\nConf:  3\n\nWORD START END ASDSCORE\n"
                                          "THE 0.04 0.16 1.2\n2 0.16 0.30 2.0\nOF 0.30 0.38 1.9\nTHEM 0.38 0.50 1.7\n",
             "6339356267468615354/00010": "Text:  BUT IT WAS HARD\nConf:  2\n",
             "6343252661930009508/00001": "Text:  GOOD EVENING\nConf:  4\n",
             "6331559613336179781/00003": "Conf:  4\nText:  OUT OF ORDER\n"}  # malformed: Text is not first
    for clip, text in texts.items():
        write_clip(root / "main" / f"{clip}.mp4", face_frames())
        (root / "main" / f"{clip}.txt").write_text(text)
    (root / "main/6331559613336179781/00002.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video")
    (root / "main/6331559613336179781/00002.txt").write_text("Text:  CORRUPT\n")
    return root


@pytest.fixture(scope="module")
def lrs2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("lrs2")
    src, out = make_lrs2(root / "lrs2"), root / "shards"
    return src, out, convert("lrs2", src, out)


def test_lrs2_writes_the_avspeech_fields(lrs2: tuple[Path, Path, dict[str, Any]]) -> None:
    src, out, manifest = lrs2
    assert manifest["counts"] == {"train": 2, "val": 1, "test": 1}
    samples = {s["__key__"]: s for s in read_shards(out / "train-{000000..000001}.tar")}
    assert set(samples) == {"6330311066473698535_00011", "6330311066473698535_00012"}
    item = samples["6330311066473698535_00012"]
    assert {"mp4", "flac", "txt", "json"} <= set(item)
    assert item["txt"].decode() == "the two of them"
    meta = json.loads(item["json"])
    assert meta["id"] == "6330311066473698535/00012" and meta["split"] == "train" and meta["crop"] == "lrs2-mouth"
    assert meta["words"][1] == ["2", 0.16, 0.3] and meta["num_frames"] == 15 and meta["source_fps"] == 25.0
    video = decode_video(item["mp4"], num_frames=100, size=None).numpy()
    assert video.shape == (15, 3, avspeech.ROI_SIZE, avspeech.ROI_SIZE)
    colour = video[:, :, 8:-8, 8:-8].mean(axis=(0, 2, 3))  # the crop is the red mouth region, not the blue face
    assert colour[0] > 150 and colour[2] < 80
    audio = decode_audio(item["flac"], RATE)
    assert abs(len(audio) / RATE - 0.6) < 0.1 and audio.float().std() > 3000
    assert json.loads((out / "meta.json").read_text())["corpus"] == "lrs2"


def test_lrs2_bad_sources_are_skipped_and_named(lrs2: tuple[Path, Path, dict[str, Any]]) -> None:
    src, _, manifest = lrs2
    assert manifest["skipped"] == {"corrupt video": 1, "malformed transcript": 1}
    files = {entry["file"]: entry["reason"] for entry in manifest["skipped_files"]}
    assert files[str(src / "main/6331559613336179781/00002.mp4")] == "corrupt video"
    assert files[str(src / "main/6331559613336179781/00003.txt")] == "malformed transcript"


def test_lrs2_missing_video_is_skipped(tmp_path: Path) -> None:
    src = tmp_path / "lrs2"
    src.mkdir()
    (src / "test.txt").write_text("6343252661930009508/00001\n")
    (src / "main/6343252661930009508").mkdir(parents=True)
    (src / "main/6343252661930009508/00001.txt").write_text("Text:  GOOD EVENING\n")
    manifest = convert("lrs2", src, tmp_path / "out")
    assert manifest["skipped"] == {"missing video": 1}
    assert manifest["skipped_files"][0]["file"] == str(src / "main/6343252661930009508/00001.mp4")


def test_malformed_split_list_stops_with_the_file_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "train.txt").write_text("6330311066473698535/00011\nnot-a-clip-id\n")
    with pytest.raises(SystemExit):
        convert("lrs2", tmp_path, tmp_path / "out")
    assert f"{tmp_path / 'train.txt'}:2" in capsys.readouterr().err


def test_lrs3_split_folders_and_crop_boxes(tmp_path: Path) -> None:
    src = tmp_path / "lrs3"
    for split, clip in (("trainval", "0af00UcTOSc/50001"), ("test", "0Fi83BHQsMA/00002")):
        write_clip(src / split / f"{clip}.mp4", face_frames(size=96))
        (src / split / f"{clip}.txt").write_text("Text:  SO I THINK\nConf:  4\n")
    boxes = {"0Fi83BHQsMA/00002": [[0, 0, 20, 20]] * 15}  # per frame: the blue top-left corner
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    manifest = convert("lrs3", src, tmp_path / "out", "--crop-boxes", str(tmp_path / "boxes.json"))
    assert manifest["counts"] == {"trainval": 1, "test": 1} and manifest["options"]["crop_boxes"] == 1
    [item] = read_shards(tmp_path / "out/test-000000.tar")
    assert json.loads(item["json"])["crop"] == "boxes"
    colour = decode_video(item["mp4"], num_frames=100, size=None).float().mean(dim=(0, 2, 3))
    assert colour[2] > 150 and colour[0] < 80


def test_crop_options_parse_and_fail_clearly(tmp_path: Path) -> None:
    assert avspeech.crop_choice("fixed:1,2,41,42", None).default == (1.0, 2.0, 41.0, 42.0)
    choice = avspeech.crop_choice("lrs2-mouth", None)
    assert choice.fraction and choice.for_clip("a/b")["crop_name"] == "lrs2-mouth"
    with pytest.raises(ConvertError, match="--crop"):
        avspeech.crop_choice("mouth", None)
    with pytest.raises(ConvertError, match="x1 > x0"):
        avspeech.crop_choice("fixed:10,0,5,5", None)
    table = tmp_path / "boxes.csv"
    table.write_text("id,frame,x0,y0,x1,y1\na/1,1,10,10,20,20\na/1,0,0,0,10,10\nb/2,,5,5,15,15\n")
    boxes = avspeech.read_crop_boxes(table)
    assert boxes == {"a/1": ((0, 0, 10, 10), (10, 10, 20, 20)), "b/2": (5, 5, 15, 15)}
    table.write_text("id,x0,y0,x1,y1\na/1,0,0,ten,10\n")
    with pytest.raises(ConvertError, match=f"{table}:2"):
        avspeech.read_crop_boxes(table)
    frames = np.zeros((3, 40, 40, 3), np.uint8)
    frames[:, 20:, 20:] = 255
    crops = avspeech.crop_frames(frames, ((0, 0, 20, 20), (20, 20, 40, 40), (20, 20, 40, 40)))
    assert crops.shape == (3, 64, 64, 3) and crops[0].max() == 0 and crops[1].min() == 255
    with pytest.raises(SkipSample, match="fewer crop boxes"):
        avspeech.crop_frames(frames, ((0, 0, 20, 20),))


# ---------------------------------------------------------------------------------------------------------- GRID


ALIGN = "0 23750 sil\n23750 29500 bin\n29500 34000 blue\n34000 35500 at\n35500 41000 f\n41000 47250 two\n" \
        "47250 53000 now\n53000 74500 sil\n"


def make_grid(root: Path) -> Path:
    for speaker, clip in (("s1", "bbaf2n"), ("s3", "bbaf3s"), ("s3", "lgaz8p"), ("s4", "pwij3p")):
        write_clip(root / speaker / f"{clip}.mpg", face_frames(size=96), video_codec="mpeg1video", audio_codec="mp2")
        (root / "align" / speaker).mkdir(parents=True, exist_ok=True)
        (root / "align" / speaker / f"{clip}.align").write_text(ALIGN)
    (root / "align/s3/lgaz8p.align").write_text("0 23750\n")  # malformed: no word
    return root


def test_grid_alignments_speaker_splits_and_bad_align(tmp_path: Path) -> None:
    src = make_grid(tmp_path / "grid")
    manifest = convert("grid", src, tmp_path / "out", "--val-speakers", "s4", "--crop", "fixed:19,38,77,96")
    assert manifest["counts"] == {"train": 1, "val": 1, "test": 1}
    assert manifest["options"]["test_speakers"] == ["s1", "s2", "s20", "s22"]
    assert manifest["skipped_files"] == [{"split": "train", "file": str(src / "align/s3/lgaz8p.align"),
                                          "reason": "malformed alignment"}]
    [item] = read_shards(tmp_path / "out/test-000000.tar")
    meta = json.loads(item["json"])
    assert item["__key__"] == "s1_bbaf2n" and item["txt"].decode() == "bin blue at f two now"
    assert meta["speaker"] == "s1" and meta["words"][0] == ["bin", 0.95, 1.18]
    assert decode_video(item["mp4"], num_frames=100, size=None).float().mean(dim=(0, 2, 3))[0] > 150


# ---------------------------------------------------------------------------------------------------------- CMLR


def make_cmlr(root: Path) -> Path:
    clips = {"train": ["s1/20170121/section_1_000.00_002.04", "s1/20170121/section_2_002.04_004.10"],
             "val": ["s2/20170122/section_1_000.50_002.30"], "test": ["s3/20170123/section_4_010.00_012.00"]}
    for split, ids in clips.items():
        (root / f"{split}.csv").parent.mkdir(parents=True, exist_ok=True)
        (root / f"{split}.csv").write_text("\n".join(ids) + "\n")
        for clip in ids:
            write_clip(root / "video" / f"{clip}.mp4", face_frames(size=64), seconds=None)
            (root / "audio" / f"{clip}.wav").parent.mkdir(parents=True, exist_ok=True)
            sf.write(root / "audio" / f"{clip}.wav", 0.2 * np.sin(np.arange(8820) / 22050 * 2 * np.pi * 300), 22050)
            (root / "text" / f"{clip}.txt").parent.mkdir(parents=True, exist_ok=True)
            (root / "text" / f"{clip}.txt").write_text("今天，中央气象台发布了 2 条预警。\n")
    (root / "audio/s1/20170121/section_2_002.04_004.10.wav").unlink()
    return root


def test_cmlr_keeps_chinese_transcripts_and_reads_the_wav(tmp_path: Path) -> None:
    src = make_cmlr(tmp_path / "cmlr")
    manifest = convert("cmlr", src, tmp_path / "out")
    assert manifest["counts"] == {"train": 1, "val": 1, "test": 1} and manifest["skipped"] == {"missing audio": 1}
    [item] = read_shards(tmp_path / "out/val-000000.tar")
    assert item["txt"].decode() == "今天 中央气象台发布了 2 条预警"
    assert abs(len(decode_audio(item["flac"], RATE)) - 8820 * RATE / 22050) < 2


def test_cmlr_malformed_list_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("id\ns1/20170121\n")
    from xmodal.data.convert import cmlr

    with pytest.raises(ConvertError, match=f"{tmp_path / 'train.csv'}:2"):
        cmlr.read_list(tmp_path / "train.csv")


# ------------------------------------------------------------------------------------------------ training on it


@pytest.mark.parametrize("fmt", ["lrs2", "grid"])
def test_converted_shards_train_the_tiny_lipreading_recipe(fmt: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning as L
    import torch

    from xmodal.commands.main import main

    if fmt == "lrs2":
        src = make_lrs2(tmp_path / "src")
        convert(fmt, src, tmp_path / "out")
    else:
        src = make_grid(tmp_path / "src")
        convert(fmt, src, tmp_path / "out", "--val-speakers", "s4", "--test-speakers", "s1")
    trainers: list[L.Trainer] = []
    fit = L.Trainer.fit

    def recording_fit(self: L.Trainer, *args: Any, **kwargs: Any) -> Any:
        trainers.append(self)
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "fit", recording_fit)
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(ROOT / "configs/tiny/lipreading.yaml"), "--trainer.fast_dev_run=true",
          f"--data.train={tmp_path}/out/train-*.tar", f"--data.val={tmp_path}/out/val-*.tar", "--data.batch_size=1"])
    [trainer] = trainers
    assert trainer.global_step == 1 and torch.isfinite(trainer.callback_metrics["train/loss"])
