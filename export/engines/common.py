"""Facts every part of the engine build shares: the error type, the component list, the builder names, and the
temporary-name-then-rename file write."""
from __future__ import annotations

import os
from pathlib import Path

from ...runtime.contract import TRT_MODULES

ENGINES_FORMAT_VERSION = 1
BUILDERS = TRT_MODULES                                                # --builder name -> Python module
BUILDER_ORDER = ("tensorrt", "tensorrt-rtx")                           # tried in this order when not chosen
ENGINE_COMPONENTS = ("text_encoder", "dit_cond", "dit_uncond", "vae_decoder", "guided_step")
LAYERS_SUFFIX = ".layers.json"
LAYERS_FORMAT = "ideogram4-engine/engine-layers"


class EngineBuildError(ValueError):
    """A refusal or a failed build; the message says what and why."""


def atomic_write(path: Path, data) -> None:
    """Write to `.<name>.tmp-<pid>`, fsync, rename: a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
