"""The frozen-feature cache: compute `model.frozen_features(pixels)` once per image, train from it.

Everything before the first trainable module is frozen, so its output depends only on the image,
the frozen weights and the image transform. Caching it removes the vision tower (and, in the
released layout, the Q-Former) from every training step.

Layout of a cache folder:
    manifest.json                  fingerprint, views, feature shape, every sample's key, source and text
    features-00000.safetensors     one fp16 tensor (views, N, C) per sample, named by its cache id

The fingerprint hashes the frozen weights, the transform and the dtype. A cache made with other
weights or another transform is refused (`StaleCacheError`) instead of silently training on stale
features. With a random training transform, `views` augmented views are stored per image and one is
drawn per sample per pass, as a stand-in for fresh augmentation every epoch.

Modules: `layout` (names, version, fingerprint), `writer` (`build_cache`, reading the datasets through
the training readers), `reader` (`FeatureCache`), `sampler` (`feature_batches`, `cached_batches`).
"""

from minigpt4.feature_cache.layout import MANIFEST, StaleCacheError, data_transform, fingerprint
from minigpt4.feature_cache.reader import CachedSample, FeatureCache
from minigpt4.feature_cache.sampler import cached_batches, feature_batches
from minigpt4.feature_cache.writer import build_cache

__all__ = ["MANIFEST", "CachedSample", "FeatureCache", "StaleCacheError", "build_cache", "cached_batches",
           "data_transform", "feature_batches", "fingerprint"]
