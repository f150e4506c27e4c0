"""Students for audio-visual pairs: a video student that learns an audio teacher's features (audio -> video).

The student's time axis is the video's (one step per frame); a teacher's time axis is usually finer (wav2vec2:
50 Hz), so sequence losses align the two by resampling with the masks.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from xmodal.contracts import Batch, Outputs
from xmodal.modalities.audio import AlignmentHead, lengths_to_mask
from xmodal.modalities.image import OPENAI_MEAN, OPENAI_STD
from xmodal.modalities.video import VideoEncoder
from xmodal.zoo.hub import HubMixin


class VideoStudent(nn.Module, HubMixin):
    """:class:`~xmodal.modalities.video.VideoEncoder` + an alignment head to the teacher's width.

    Args:
        out_dim: teacher feature width (e.g. the audio teacher's ``hidden_size``).
        dim: encoder width. depth: transformer layers. heads: attention heads.
        channels: width of the 3D-conv frontend.
        head_hidden: hidden width of an MLP alignment head (``None``: linear).
        mean, std: per-channel normalisation of [0, 1] frames. dropout: transformer dropout.

    ``forward(batch)`` reads ``video`` (``B x T x 3 x H x W``, float in [0, 1] or uint8) and ``video_lengths``
    and returns ``video.feat`` (float ``B x T x out_dim``, zero at padding) and ``video.mask`` (bool ``B x T``,
    True at valid frames).
    """

    output_keys = ("video.feat", "video.mask")

    def __init__(
        self, out_dim: int, dim: int = 128, depth: int = 2, heads: int = 4, channels: int = 16,
        head_hidden: int | None = None, mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.init_args = {"out_dim": out_dim, "dim": dim, "depth": depth, "heads": heads, "channels": channels,
                          "head_hidden": head_hidden, "mean": list(mean), "std": list(std), "dropout": dropout}
        self.encoder = VideoEncoder(dim, depth, heads, channels, mean=mean, std=std, dropout=dropout)
        self.head = AlignmentHead(dim, out_dim, head_hidden)

    def forward(self, batch: Batch) -> Outputs:
        feats, lengths = self.encoder(batch["video"], batch["video_lengths"].to(batch["video"].device))
        mask = lengths_to_mask(lengths, feats.shape[1])
        return {"video.feat": self.head(feats) * mask[..., None].to(feats.dtype), "video.mask": mask}
