"""``deepcount train``: its own parser (YAML configs, then --section.key overrides;
:func:`deepcount.config.config_parser`), then the run.  The config is read before torch and
Lightning are imported, so ``--help`` and a bad option answer at once."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from ..config import parse_config
from ..extras import MissingExtraError, require


def main(argv: Sequence[str]) -> int:
    """``deepcount train ...``: 0 on success, 1 when training fails, 2 for a bad config."""
    try:
        require("train", "jsonargparse", "yaml")  # the parser
        cfg = parse_config(argv)
        require("train")  # the run: Lightning (seconds to import, with torch)
    except MissingExtraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from ..training import check_config, train
    from .common import training_failure

    try:
        check_config(cfg)
        result = train(cfg)
    except Exception as e:  # noqa: BLE001 - ours get their exit code, the rest propagate
        code = training_failure(e)
        if code is None:
            raise
        return code
    if "weights" in result:
        print(f"weights: {result['weights']}\nsidecar: {result['sidecar']}\n"
              f"metrics: {json.dumps(result['metrics'])}")
    return 0
