"""InstructPix2Pix: dataset generation (caption edits, Prompt-to-Prompt pairs, CLIP filtering),
fine-tuning and evaluation, on any diffusers Stable Diffusion and any local CLIP."""
from .captions import dataset_captions, jsonl_captions, screen, world_captions
from .records import Caption, CaptionEdit, CaptionError, Rejected, check_caption, read_jsonl, write_jsonl
from .rules import RulesEditor

__all__ = [
    "Caption", "CaptionEdit", "CaptionError", "Rejected", "RulesEditor", "check_caption", "dataset_captions",
    "jsonl_captions", "read_jsonl", "screen", "world_captions", "write_jsonl",
]
