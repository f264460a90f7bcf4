"""CLIPScore (Hessel et al. 2021): how well a caption describes its image by a CLIP model,
``2.5 * max(cos(E_image, E_text), 0)`` per (image, caption), the mean over a split reported by
`raytrain eval` (eval.clip_path). Reference-free; seed 003 reports it beside BLEU / METEOR.

Weights come only from a local folder (``save_pretrained`` of a CLIPModel + CLIPProcessor, e.g.
openai/clip-vit-base-patch32 as seed 003 used); nothing is downloaded. Captions longer than the
text tower's context are truncated by the processor, as CLIPScore's reference code does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

WEIGHT = 2.5


class ClipScore:
    """Scores (image, caption) pairs with the CLIP model in ``model_path`` on ``device``."""

    def __init__(self, model_path: str, device: str = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        if not model_path or not os.path.isdir(model_path):
            raise FileNotFoundError(f"CLIP weights folder not found: {model_path!r} (eval.clip_path; nothing is downloaded)")
        self.device = device
        self.processor = CLIPProcessor.from_pretrained(model_path, local_files_only=True)
        self.model = CLIPModel.from_pretrained(model_path, local_files_only=True).to(device).eval()

    def scores(self, images: Sequence, captions: Sequence[str]) -> list[float]:
        """One CLIPScore per (image, caption) pair (PIL images or HxWx3 uint8 arrays)."""
        import torch

        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images for {len(captions)} captions")
        if not captions:
            return []
        enc = self.processor(text=[str(c) for c in captions], images=list(images), return_tensors="pt", padding=True,
                             truncation=True).to(self.device)
        with torch.inference_mode():
            img = _features(self.model.get_image_features(pixel_values=enc["pixel_values"]))
            txt = _features(self.model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]))
        cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
        return [WEIGHT * max(float(c), 0.0) for c in cos]


def _features(out):
    """The projected embeddings: transformers < 5 returns the tensor, 5.x an output whose
    pooler_output holds them."""
    import torch

    return out if isinstance(out, torch.Tensor) else out.pooler_output
