"""Checkpoints on disk (SPEC §7): lazy readers, a streaming safetensors writer, merge
configs (bcjax's form and mergekit's YAML) and streaming merges with bounded memory.

An app layer over the core: it composes :mod:`bcjax.merging` with file formats and knows
nothing of experiments. ``bcjax merge CONFIG --out DIR`` is :func:`merge_checkpoints`.
"""
from bcjax.checkpoints.io import Checkpoint, load_state_dict, open_checkpoint, save_safetensors
from bcjax.checkpoints.merge_config import MergePlan, from_mergekit, load_merge_config, parse_merge_config
from bcjax.checkpoints.streaming import merge_checkpoints, model_card, partial_folder, validate_checkpoints

__all__ = ["Checkpoint", "open_checkpoint", "load_state_dict", "save_safetensors", "MergePlan", "from_mergekit",
           "load_merge_config", "parse_merge_config", "merge_checkpoints", "validate_checkpoints", "model_card",
           "partial_folder"]
