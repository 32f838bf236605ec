"""Qwen2.5-VL (``Qwen/Qwen2.5-VL-*`` layout): Qwen2-VL's pruning
(:mod:`vllm_vtprune.families.qwen2_vl`) on a tower with window attention in most blocks
("Qwen2.5-VL Technical Report", arXiv 2502.13923, Sec. 2.1). The encoder reorders
patches into windows and restores the order after its merger, so the methods see the
merged tokens in raster order, as on Qwen2-VL. ResPrune's text-gate strength on this
family is 0.3 in its paper (Sec. IV-A1, Table V), the family's default.
"""
from __future__ import annotations

from vllm_vtprune.families import Family
from vllm_vtprune.families import qwen2_vl as base

ARCHITECTURE = "VTPruneQwen2_5_VLForConditionalGeneration"
EncoderTower = base.EncoderTower


def matches(hf_config) -> bool:
    return getattr(hf_config, "model_type", None) == "qwen2_5_vl"


FAMILY = Family(
    name="Qwen2.5-VL",
    description="model_type 'qwen2_5_vl', e.g. Qwen/Qwen2.5-VL-7B-Instruct",
    architecture=ARCHITECTURE,
    vllm_class="vllm_vtprune.models.qwen2_vl:VTPruneQwen2_5_VLForConditionalGeneration",
    matches=matches,
    check=base.check,
    grid=base.grid,
    question_ids=base.FAMILY.question_ids,
    provides=base.PROVIDES,
    images=base.IMAGES + "; window attention in the tower",
    defaults=base.RESPRUNE_ALPHA,
    reference="vllm_vtprune.hf:HfQwen25Reference",
)
