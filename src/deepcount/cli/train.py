"""``deepcount train``: its own parser (YAML configs, then --section.key overrides;
:func:`deepcount.training.config_parser`), then the run."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence


def main(argv: Sequence[str]) -> int:
    """``deepcount train ...``: 0 on success, 1 when training fails, 2 for a bad config."""
    from ..datasets import DataNotFoundError
    from ..extras import MissingExtraError, require

    try:
        require("train")
    except MissingExtraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from ..training import ConfigError, NonFiniteLossError, check_config, parse_config, train

    cfg = parse_config(argv)
    try:
        check_config(cfg)
        result = train(cfg)
    except (ConfigError, DataNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if "weights" in result:
        print(f"weights: {result['weights']}\nsidecar: {result['sidecar']}\n"
              f"metrics: {json.dumps(result['metrics'])}")
    return 0
