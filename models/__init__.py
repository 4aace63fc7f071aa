"""MaskFeat models: MViTv2 and ViT backbones, the MaskFeat pre-training model, the fine-tuning
classifier, the variant table and official-checkpoint helpers (DESIGN §3.2–§3.5).

Models never import the engine, DeepSpeed or DALI. ``create_model(name, task)`` is the entry
point; see ``python -m models`` for every variant and its exact parameter count.
"""
from .checkpoint import (
    LoadReport,
    adapt_state_dict,
    extract_model_state,
    load_backbone_into_classifier,
    load_state_dict_official,
)
from .classifier import Classifier
from .masking import MASK_KINDS, cube_mask, frame_mask, image_block_mask, make_masks, tube_mask, upsample_mask
from .maskfeat import MaskFeat, MaskFeatOutput, pixel_targets
from .mvit import MViT, MultiScaleAttention, MultiScaleBlock, resize_rel_pos
from .variants import TASKS, VARIANTS, Variant, count_parameters, create_model, get_variant
from .vit import ViT, vit_kwargs

__all__ = [
    "create_model",
    "get_variant",
    "count_parameters",
    "VARIANTS",
    "TASKS",
    "Variant",
    "MViT",
    "MultiScaleBlock",
    "MultiScaleAttention",
    "resize_rel_pos",
    "ViT",
    "vit_kwargs",
    "MaskFeat",
    "MaskFeatOutput",
    "pixel_targets",
    "Classifier",
    "MASK_KINDS",
    "make_masks",
    "cube_mask",
    "tube_mask",
    "frame_mask",
    "image_block_mask",
    "upsample_mask",
    "LoadReport",
    "extract_model_state",
    "adapt_state_dict",
    "load_state_dict_official",
    "load_backbone_into_classifier",
]
