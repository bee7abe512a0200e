"""CLIP text towers, one adapter per family behind one interface (``base.TowerFamily``).

Every question of the form "which model is this" in the library goes through here; a
new family is one file with a ``FAMILY`` and one line in ``FAMILIES``. The family is chosen
by the model's structure, not its module path (vendored copies of OpenAI's ``clip`` live
under other module names):

* ``hf_transformers``: transformers ``CLIPModel`` / ``CLIPTextModel(WithProjection)``
* ``openai_clip``:     OpenAI ``clip.model.CLIP`` (masks on the blocks, sequence-first)
* ``openclip``:        open_clip ``CLIP`` / ``CustomTextCLIP``
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import hf_transformers, openai_clip, openclip
from .base import LayerView, TextTower, TowerFamily, UnsupportedTextTower, pool_positions

Tensor = torch.Tensor

# Order matters only where structures overlap: OpenAI's blocks hold masks, open_clip's do not.
FAMILIES = (hf_transformers.FAMILY, openai_clip.FAMILY, openclip.FAMILY)

__all__ = ["FAMILIES", "LayerView", "TextTower", "TowerFamily", "UnsupportedTextTower", "family",
           "pool_positions", "text_tower"]


def family(model: nn.Module) -> TowerFamily:
    """The family of ``model`` by structure, or ``UnsupportedTextTower``."""
    for fam in FAMILIES:
        if fam.matches(model):
            return fam
    raise UnsupportedTextTower(f"{type(model).__name__} is not a supported CLIP model (open_clip CLIP / "
                               "CustomTextCLIP, transformers CLIPModel / CLIPTextModel(WithProjection), or "
                               "OpenAI clip.model.CLIP)")


def text_tower(model: nn.Module) -> TextTower:
    """A ``TextTower`` view of ``model``'s text tower, or ``UnsupportedTextTower`` saying why."""
    if isinstance(model, TextTower):
        return model
    return family(model).text_tower(model)
