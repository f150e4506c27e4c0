"""Distillation losses; every one is a :class:`xmodal.contracts.DistillLoss`, usable from YAML by class name.

The callbacks that drive some of them during training (mixup/CutMix, HARD, TGeo-KD's meta step, MixSpeech's
schedule) are in :mod:`xmodal.callbacks`."""

from xmodal.losses.augment import CutMixKD, HARDAugmenter, MixupKD
from xmodal.losses.bev import (
    BEVDetectionLoss,
    UniDistillFeatureLoss,
    UniDistillRelationLoss,
    UniDistillResponseLoss,
)
from xmodal.losses.cka import CKALoss, linear_cka
from xmodal.losses.contrastive import AffinityMimicLoss, CLIPContrastiveLoss, DCDLoss
from xmodal.losses.features import FeatureCosineLoss, FeatureMSELoss
from xmodal.losses.libs import (
    CharCELoss,
    CharCTCLoss,
    FrameAligner,
    LIBSContextLoss,
    LIBSFrameLoss,
    LIBSSequenceLoss,
)
from xmodal.losses.logits import DKDLoss, HardLabelLoss, JSDivLoss, KLDivLoss, ReverseKLLoss
from xmodal.losses.masked import MaskedFeatureLoss, partial_forward, random_patch_mask
from xmodal.losses.mixspeech import MixSpeechLoss, mix_ratio
from xmodal.losses.nd import NormDirectionLoss
from xmodal.losses.ofa import OFALoss
from xmodal.losses.ranking import DSELoss, MarginMSELoss
from xmodal.losses.relations import RKDLoss, TRGLoss
from xmodal.losses.sequence import TimeAlignedMSELoss
from xmodal.losses.sinkhorn import SinkhornLoss
from xmodal.losses.sparsity import SparsityLagrangianLoss
from xmodal.losses.taid import TAIDLoss
from xmodal.losses.weighting import TGeoKDLoss

__all__ = [
    "BEVDetectionLoss",
    "UniDistillFeatureLoss",
    "UniDistillRelationLoss",
    "UniDistillResponseLoss",
    "CharCELoss",
    "CharCTCLoss",
    "FrameAligner",
    "LIBSContextLoss",
    "LIBSFrameLoss",
    "LIBSSequenceLoss",
    "MixSpeechLoss",
    "mix_ratio",
    "AffinityMimicLoss",
    "CutMixKD",
    "DCDLoss",
    "DSELoss",
    "HARDAugmenter",
    "MarginMSELoss",
    "MixupKD",
    "RKDLoss",
    "TGeoKDLoss",
    "TRGLoss",
    "CKALoss",
    "CLIPContrastiveLoss",
    "DKDLoss",
    "FeatureCosineLoss",
    "FeatureMSELoss",
    "HardLabelLoss",
    "JSDivLoss",
    "KLDivLoss",
    "MaskedFeatureLoss",
    "NormDirectionLoss",
    "OFALoss",
    "ReverseKLLoss",
    "SinkhornLoss",
    "SparsityLagrangianLoss",
    "TAIDLoss",
    "TimeAlignedMSELoss",
    "linear_cka",
    "partial_forward",
    "random_patch_mask",
]
