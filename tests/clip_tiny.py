"""A tiny randomly initialised open_clip model for fast CPU tests (32 px images, width 64).

``tiny_config(folder)`` writes its open_clip config JSON (the file name is the model name)
and registers it; ``tiny_clip(seed)`` builds the model and its tokenizer.
"""

import json
from pathlib import Path

import torch

NAME = "DemulTiny-test"
CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def tiny_config(folder) -> Path:
    import open_clip

    path = Path(folder) / f"{NAME}.json"
    path.write_text(json.dumps(CONFIG))
    open_clip.add_model_config(path)
    return path


def tiny_clip(folder, seed: int = 0):
    import open_clip

    tiny_config(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(NAME, pretrained=None)
    return model.eval(), open_clip.get_tokenizer(NAME)


def tiny_hf_clip(eos_token_id: int = 49407, width: int = 64, seed: int = 0):
    """A small random transformers CLIPModel (2 text layers, float64, eval, frozen)."""
    import transformers

    text_cfg = dict(vocab_size=49408, hidden_size=width, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=2, max_position_embeddings=77, eos_token_id=eos_token_id,
                    bos_token_id=49406, pad_token_id=0, hidden_act="quick_gelu")
    vision_cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      image_size=32, patch_size=16)
    torch.manual_seed(seed)
    config = transformers.CLIPConfig(text_config=text_cfg, vision_config=vision_cfg, projection_dim=48)
    return transformers.CLIPModel(config).double().eval().requires_grad_(False)


def tiny_openai_clip(width: int = 64, heads: int = 2, layers: int = 2, seed: int = 0, dtype=torch.float64,
                     embed_dim: int = 48):
    """A small random OpenAI ``clip.model.CLIP`` (ViT image tower of width 64 at 32 px),
    LayerNorm affines and biases moved away from their init, eval, frozen, the same weights
    for every ``dtype``:

    * float32: as built;
    * float16: cast as ``clip.build_model`` casts (``convert_weights``: linear layers,
      attention and projections float16; embeddings and LayerNorms stay float32);
    * float64: ``.double()``, with clip's LayerNorm (which runs in float32 and fails on
      float64 weights) made a plain ``nn.LayerNorm``: the same function in float64.
    """
    import clip.model

    torch.manual_seed(seed)
    model = clip.model.CLIP(embed_dim=embed_dim, image_resolution=32, vision_layers=1, vision_width=64,
                            vision_patch_size=16, context_length=77, vocab_size=49408, transformer_width=width,
                            transformer_heads=heads, transformer_layers=layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    if dtype == torch.float16:
        clip.model.convert_weights(model)
    elif dtype == torch.float64:
        for module in model.modules():
            if isinstance(module, clip.model.LayerNorm):
                module.__class__ = torch.nn.LayerNorm
        model = model.double()
    return model.eval().requires_grad_(False)


def openai_tokenize(texts):
    """OpenAI's ``clip.tokenize`` (truncating names past 77 tokens to end in EOT)."""
    import clip

    return clip.tokenize(texts, truncate=True)
