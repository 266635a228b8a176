"""Image features: what `generate` computes from an image's pixels, and a bounded LRU of them keyed by image content."""

from __future__ import annotations

from collections import OrderedDict

import torch


class ImageFeatureCache:
    """A bounded LRU of image features (`image_embeds`) keyed by image content digest."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> torch.Tensor | None:
        """The features for `key`, marked as recently used, or None."""
        features = self._entries.get(key)
        if features is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return features

    def put(self, key: str, features: torch.Tensor) -> None:
        """Keep `features`, evicting the least recently used entries beyond capacity."""
        if self.capacity == 0:
            return
        self._entries[key] = features
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def discard(self, key: str, features: object) -> None:
        """Forget `key` if it still holds `features`."""
        if self._entries.get(key) is features:
            del self._entries[key]

    def clear(self) -> None:
        """Forget every entry and reset the hit and miss counts."""
        self._entries.clear()
        self.hits = self.misses = 0

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)


def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """What Kosmos-2's `generate` computes from pixels: vision encoder -> post-layernorm -> L2 norm -> resampler."""
    hidden = model.vision_model.model.post_layernorm(model.vision_model(pixel_values)[0])
    return model.image_to_text_projection(torch.nn.functional.normalize(hidden, dim=-1))[0]


def flattened_patch_features(model, flattened_patches: torch.Tensor) -> torch.Tensor:
    """What Kosmos-2.5's `generate` computes from an image's patches: vision encoder (padding patches, all zeros,
    masked) -> L2 norm -> projection onto the image tokens."""
    hidden = model.vision_model(flattened_patches=flattened_patches).last_hidden_state
    return model.image_to_text_projection(torch.nn.functional.normalize(hidden, dim=-1))[0]
