"""The engine's two caches in one object, shared by the parts that use them: the preparer reads `features`
(visual features of repeated media), the model runner `prefixes` (KV of repeated prompt prefixes). Turning them
off turns them off for every part at once."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from .feature_cache import FeatureCache
from .serving.prefix_cache import PrefixCache


@dataclass
class Caches:
    features: FeatureCache | None = None
    prefixes: PrefixCache | None = None

    @contextlib.contextmanager
    def off(self):
        """Neither cache for what runs inside (measuring what computing costs). Only while nothing else runs."""
        features, prefixes = self.features, self.prefixes
        self.features = self.prefixes = None
        try:
            yield
        finally:
            self.features, self.prefixes = features, prefixes
