"""Converters from public dataset layouts to our shard format; one module per source.

Modules are imported on demand, so e.g. Meta-World is needed only to convert Meta-World.
"""

from __future__ import annotations

import importlib

from lapa_dist.data.convert import Source

SOURCES = {
    "videos": "lapa_dist.data.sources.videos:VideoFolderSource",
    "ssv2": "lapa_dist.data.sources.ssv2:SSv2Source",
    "rlds": "lapa_dist.data.sources.rlds:RLDSSource",
    "lerobot": "lapa_dist.data.sources.lerobot:LeRobotSource",
    "metaworld": "lapa_dist.data.sources.metaworld:MetaWorldSource",
    "sprites": "lapa_dist.data.sources.sprites:SpriteSource",
}


def source_class(name: str) -> type[Source]:
    if name not in SOURCES:
        raise ValueError(f"--source {name!r}: expected one of {', '.join(SOURCES)}")
    module_name, class_name = SOURCES[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)
