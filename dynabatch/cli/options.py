"""`--policy-opt KEY=VALUE`: set any PolicyConfig field from the command line or env."""
from __future__ import annotations

import dataclasses
import typing

from dynabatch.scheduler_svc.policy import PolicyConfig


def policy_config(pairs: list[str] | None) -> PolicyConfig:
    """PolicyConfig with each KEY=VALUE applied (typed by the field). Raises ValueError."""
    fields = {f.name: f for f in dataclasses.fields(PolicyConfig)}
    hints = typing.get_type_hints(PolicyConfig)
    changes = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise ValueError(f"--policy-opt {pair!r}: expected KEY=VALUE with KEY one of "
                             f"{', '.join(sorted(fields))}")
        changes[key] = _coerce(hints[key], raw.strip(), key)
    return PolicyConfig(**changes)


def _coerce(kind, raw: str, key: str):
    try:
        if kind is bool:
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes")
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
    except ValueError:
        raise ValueError(f"--policy-opt {key}: {raw!r} is not a {kind.__name__}") from None
    return raw     # Literal choices: PolicyConfig / the policy check them
