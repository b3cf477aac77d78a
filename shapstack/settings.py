"""One settings object for the whole system.

Precedence, lowest first: defaults (embedded mode) < config file < SHAPSTACK_* environment
variables < CLI flags. The config file is TOML: ``--config FILE``, ``SHAPSTACK_CONFIG`` or
``./shapstack.toml`` when it exists; its keys are the field names below.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping


@dataclass(frozen=True)
class Settings:
    # where things live
    database_url: str = "sqlite:///shapstack.db"
    broker_url: str | None = None  # None = embedded mode, no queue
    result_backend: str | None = None
    triton_url: str | None = None  # http://host:8000 or grpc://host:8001; None = in-process torch
    bundle: str | None = None  # default model bundle directory
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    # feed limits (a row over a limit is a reject with a reason, except text: truncated)
    allow_image_urls: bool = False
    url_timeout_s: float = 10.0
    max_image_bytes: int = 20_000_000
    max_image_pixels: int = 40_000_000  # decompression-bomb guard
    max_id_length: int = 128
    max_title_chars: int = 1_000
    max_description_chars: int = 10_000
    ingest_batch_size: int = 256
    verify_images: bool = True

    # inference
    batch_size: int = 32
    stacker: str = "mmshap"
    mmshap_budget: int | None = None  # coalitions per product; None = the bundle's training budget
    mmshap_image_mode: str | None = None  # token | pixel; None = the bundle's training mode

    # collapse alerts
    collapse_text_share: float = 0.5  # alert when more than this share is text-dominated
    collapse_image_share: float = 0.5
    collapse_drift: float = 0.15  # alert when mean T-SHAP moves by more than this
    collapse_min_products: int = 20  # per-category metrics need at least this many products

    # distributed
    task_time_limit_s: int = 900
    max_retries: int = 5
    infer_batch_size: int = 64

    @property
    def distributed(self) -> bool:
        return self.broker_url is not None

    def thresholds(self):
        from pipeline.collapse import Thresholds

        return Thresholds(self.collapse_text_share, self.collapse_image_share, self.collapse_drift,
                          self.collapse_min_products)

    def limits(self):
        from pipeline.records import Limits

        return Limits(**{f.name: getattr(self, f.name) for f in fields(Limits)})

    def replace(self, **changes: Any) -> "Settings":
        """Return a copy with the non-None changes applied (so CLI flags left unset do nothing)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def _coerce(value: str, kind: Any) -> Any:
    kind = str(kind)
    if "bool" in kind:
        if value.strip().lower() in {"1", "true", "yes", "on"}:
            return True
        if value.strip().lower() in {"0", "false", "no", "off", ""}:
            return False
        raise ValueError(f"not a boolean: {value!r}")
    if "int" in kind:
        return int(value)
    if "float" in kind:
        return float(value)
    if value == "" and "None" in kind:
        return None
    return value


def load_settings(
    config: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Build the settings from file, environment and overrides; raises ValueError on bad values."""
    env = os.environ if env is None else env
    known = {f.name: f for f in fields(Settings)}
    values: dict[str, Any] = {}

    path = config or env.get("SHAPSTACK_CONFIG")
    if path is None and Path("shapstack.toml").is_file():
        path = "shapstack.toml"
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"cannot read config file {path}: {exc}") from None
        data = data.get("shapstack", data)
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown setting(s) in {path}: {', '.join(unknown)}")
        values.update(data)

    for name, f in known.items():
        raw = env.get(f"SHAPSTACK_{name.upper()}")
        if raw is not None:
            try:
                values[name] = _coerce(raw, f.type)
            except ValueError as exc:
                raise ValueError(f"SHAPSTACK_{name.upper()}: {exc}") from None

    settings = Settings(**values).replace(**overrides)
    if settings.mmshap_image_mode not in {None, "token", "pixel"}:
        raise ValueError(f"mmshap_image_mode must be token or pixel, not {settings.mmshap_image_mode!r}")
    return settings
