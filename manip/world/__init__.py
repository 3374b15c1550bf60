"""EmojiWorld: a procedural captioned image world with exact ground truth for every edit."""
from .artwork import Artwork, ArtworkMissing
from .captions import all_captions, caption
from .edits import EDIT_KINDS, Edit, EditNotApplicable, apply_edit, edit_mask, render_edit
from .render import Renderer
from .sampling import SPLITS, held_out_background, resample_layout, sample_scene, scene_rng
from .scene import Placed, Scene

__all__ = [
    "Artwork", "ArtworkMissing", "EDIT_KINDS", "Edit", "EditNotApplicable", "Placed", "Renderer",
    "SPLITS", "Scene", "all_captions", "apply_edit", "caption", "edit_mask", "held_out_background",
    "render_edit", "resample_layout", "sample_scene", "scene_rng",
]
