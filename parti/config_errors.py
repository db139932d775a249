"""The one way parti reports an impossible config value: `config error: <key>: <what is wrong>`."""

from __future__ import annotations


def check_config(ok: bool, key: str, message: str) -> None:
    """Raise ValueError("config error: {key}: {message}") unless `ok`."""
    if not ok:
        raise ValueError(f"config error: {key}: {message}")
