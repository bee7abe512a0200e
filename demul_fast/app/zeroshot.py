"""Zero-shot CLIP on one of the 11 benchmarks (``demul-fast zeroshot``): the baseline the
sweep reports beside DeMul.

Each class is the normalised CLIP text feature of the dataset's prompt (CoOp's
``CUSTOM_TEMPLATES``: "a photo of a {}." and the dataset-specific ones, in
``coop_layouts.LAYOUTS``), class names with underscores as spaces; an image takes the class of
the largest cosine. Evaluated on the dataset's test split, top-1 in percent.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import phi as phi_mod
from ..data import coop_layouts
from ..data.folders import ImageList, build_transforms
from . import runtime
from .evaluate import image_features
from .models import load_clip


def zeroshot(dataset: str, root, model: str = "ViT-B-16", pretrained: str = "openai", device: Optional[str] = None,
             precision: str = "auto", batch_size: int = 128, workers: int = 4, init_seed: int = 0,
             progress: bool = True) -> dict:
    """Top-1 (%) of zero-shot CLIP on the dataset's test split.

    returns {"dataset", "template", "top1", "n", "model", "pretrained", "fingerprint"}"""
    data = coop_layouts.read(dataset, root)
    template = coop_layouts.layout(dataset).template
    dev = runtime.choose_device(device)
    amp_dtype = runtime.amp_dtype(precision, dev)
    clip, tokenizer, pre_cfg, info = load_clip(model, pretrained, dev, init_seed)
    text = phi_mod.clip_text_features(clip, tokenizer, data.classes, template=template, device=dev).to(dev)
    _, eval_tf = build_transforms(pre_cfg, False)
    loader = torch.utils.data.DataLoader(ImageList(data.items["test"], eval_tf), batch_size=batch_size,
                                         shuffle=False, num_workers=workers)
    feats, labels = image_features(clip, loader, dev, amp_dtype, progress, f"{data.name} test features")
    pred = (nn.functional.normalize(feats, dim=-1) @ text.T).argmax(-1)
    top1 = 100.0 * float((pred == labels).sum()) / max(1, labels.numel())
    return {"dataset": data.name, "template": template, "top1": top1, "n": int(labels.numel()), "model": model,
            "pretrained": pretrained, "fingerprint": info["fingerprint"]}
