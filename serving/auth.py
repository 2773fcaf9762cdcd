"""Optional API keys: from an environment variable (comma-separated) and/or a file (one per line).

No key configured anywhere means no authentication. Keys are compared in constant
time and never logged; health, readiness and metrics stay open.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from llmops.config import ConfigError, ServeConfig


def load_api_keys(cfg: ServeConfig) -> frozenset[str]:
    keys = [k.strip() for k in os.environ.get(cfg.api_keys_env, "").split(",")]
    if cfg.api_keys_file is not None:
        path = Path(cfg.api_keys_file)
        if not path.is_file():
            raise ConfigError(f"serve.api_keys_file: {path} does not exist")
        lines = (line.strip() for line in path.read_text().splitlines())
        keys += [line for line in lines if line and not line.startswith("#")]
    return frozenset(k for k in keys if k)


def key_is_valid(given: str | None, keys: frozenset[str]) -> bool:
    if given is None:
        return False
    # Compare against every key, so the time taken says nothing about which one nearly matched.
    matches = [hmac.compare_digest(given.encode(), key.encode()) for key in keys]
    return any(matches)
