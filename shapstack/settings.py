"""One settings object for the whole system.

Precedence, lowest first: defaults (embedded mode) < config file < SHAPSTACK_* environment
variables < CLI flags. The config file is TOML, named by ``--config FILE`` or ``SHAPSTACK_CONFIG``.
Unnamed, ``./shapstack.toml`` in the working directory is read only when it is a regular file owned
by the current user and writable by nobody else (anyone who can write it could turn image URLs on
or point the database elsewhere); an unsafe one is ignored with a warning. The file used is logged.
The
feed limits and the collapse thresholds are nested objects (``settings.limits``,
``settings.collapse``) whose field names are unique: in TOML they go in the tables ``[limits]`` and
``[collapse]`` or at top level, in the environment every setting is ``SHAPSTACK_<NAME>``.

Secrets can come from files (Docker and Kubernetes secrets): ``SHAPSTACK_<NAME>_FILE=/run/secrets/x``
reads the setting from that file (one trailing newline removed). Setting both ``SHAPSTACK_<NAME>``
and ``SHAPSTACK_<NAME>_FILE`` is an error.

Every value is checked for its type (``allow_image_urls = "false"`` is an error, not True) and
range; a bad value is a UserError naming the setting.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import math
import os
import stat
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from pipeline.collapse import Thresholds
from pipeline.errors import UserError
from pipeline.records import Limits

log = logging.getLogger(__name__)

SECTIONS = {"limits": Limits, "collapse": Thresholds}

# (low, high) inclusive bounds of numeric settings; None: unbounded on that side
RANGES: dict[str, tuple[float | None, float | None]] = {
    "url_timeout_s": (0.1, 600), "max_image_bytes": (1, None), "max_image_pixels": (1, None),
    "max_id_length": (1, 128), "max_title_chars": (1, None), "max_description_chars": (1, None),
    "url_max_redirects": (0, 20), "max_record_chars": (1_000, 1 << 30), "max_record_lines": (1, 1_000_000),
    "max_json_depth": (2, 200), "max_attributes": (0, 10_000), "max_attribute_chars": (1, 1 << 24),
    "max_attributes_bytes": (2, 1 << 28),
    "ingest_batch_size": (1, 100_000), "batch_size": (1, 100_000), "infer_batch_size": (1, 100_000),
    "mmshap_budget": (0, None), "mmshap_target_stderr": (0.001, 0.5), "mmshap_cap": (4, None),
    "mmshap_audit_fraction": (0, 1),
    "task_time_limit_s": (10, None), "max_retries": (0, 1000),
    "heartbeat_s": (0.5, 3600), "lease_s": (2, 86_400), "retry_budget_s": (0, 7 * 86_400),
    "signal": (0, 1), "follow": (0, 1), "min_disagreements": (1, None), "drift": (0, 1),
    "min_products": (1, None), "alert_timeout_s": (0.1, 60),
}
CHOICES: dict[str, tuple[Any, ...]] = {"mmshap_image_mode": (None, "token", "pixel"), "log_format": (None, "text", "json"),
                                       "mmshap_players": (None, "token", "word"),
                                       "mmshap_method": (None, "sampled", "amortized")}


@dataclass(frozen=True)
class Settings:
    # where things live
    database_url: str = "sqlite:///shapstack.db"
    broker_url: str | None = None  # None = embedded mode, no queue
    result_backend: str | None = None
    triton_url: str | None = None  # http://host:8000 or grpc://host:8001; None = in-process torch
    bundle: str | None = None  # default model bundle directory
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    # feeds: row limits (pipeline.records.Limits) and ingest batching
    limits: Limits = field(default_factory=Limits)
    ingest_batch_size: int = 256

    # inference
    batch_size: int = 32
    stacker: str = "mmshap"
    # MM-SHAP per product (docs/mmshap.md); None = as the bundle's stackers were trained
    mmshap_budget: int | None = None  # fixed coalitions per product (0 = off) instead of a target
    mmshap_target_stderr: float | None = None  # draws until T-SHAP's stderr is this small (default 0.03) ...
    mmshap_cap: int | None = None  # ... or this many coalitions are spent (default 4000)
    mmshap_image_mode: str | None = None  # token | pixel
    mmshap_players: str | None = None  # token | word: text players are WordPieces or whole words
    mmshap_method: str | None = None  # sampled | amortized (the bundle's explainer, docs/amortized.md)
    mmshap_audit_fraction: float | None = None  # amortized: share of products also sampled (default 0.05)

    # collapse alerts (pipeline.collapse.Thresholds)
    collapse: Thresholds = field(default_factory=Thresholds)

    # distributed
    task_time_limit_s: int = 900
    infer_batch_size: int = 64
    # faults (docs/operations.md): a worker heartbeats every heartbeat_s and is taken for dead after
    # three silent beats; what it holds is leased for lease_s, renewed by each beat
    heartbeat_s: float = 10.0
    lease_s: float = 60.0
    # errors of the world (database, broker, Triton away) are retried for this long, backoff capped at 30 s
    retry_budget_s: float = 600.0
    max_retries: int | None = None  # None: as many as retry_budget_s allows

    # observability (docs/operations.md): log lines as text or one JSON object per line; the
    # interface `shapstack worker --metrics-port` listens on; a URL that collapse flags and runs
    # finishing with failures are POSTed to (non-global addresses only with alert_webhook_private)
    log_format: str = "text"
    metrics_host: str = "127.0.0.1"
    alert_webhook_url: str | None = None
    alert_webhook_private: bool = False
    alert_timeout_s: float = 5.0

    @property
    def distributed(self) -> bool:
        return self.broker_url is not None

    def replace(self, **changes: Any) -> "Settings":
        """A copy with the non-None changes applied (CLI flags left unset change nothing).

        A name of a limits or collapse field changes that field of its section.
        """
        changes = {k: v for k, v in changes.items() if v is not None}
        nested = {}
        for section, kind in SECTIONS.items():
            names = {f.name for f in fields(kind)}
            part = {k: changes.pop(k) for k in list(changes) if k in names}
            if part:
                nested[section] = dataclasses.replace(getattr(self, section), **part)
        return validate(dataclasses.replace(self, **changes, **nested))


def _hints(kind: type) -> dict[str, Any]:
    return typing.get_type_hints(kind)


def _allowed(hint: Any) -> tuple[tuple[type, ...], bool]:
    """(accepted Python types, whether None is allowed) of a field's type hint."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else (hint,)
    return tuple(a for a in args if a is not type(None)), type(None) in args


def _check_list(name: str, value: Any, where: str) -> tuple[str, ...]:
    """A list-of-text setting: a TOML array, a tuple, or (environment) comma-separated text."""
    if isinstance(value, str):
        value = [v for v in (p.strip() for p in value.split(",")) if v]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise UserError(f"{where}: {name} must be a list of text, not {type(value).__name__} {value!r}")
    value = tuple(v.strip().lower() for v in value)
    for v in value:
        if name == "url_allow_networks":
            try:
                ipaddress.ip_network(v, strict=False)
            except ValueError:
                raise UserError(f"{where}: {name}: not a network: {v!r}") from None
    return value


def _check(name: str, value: Any, hint: Any, where: str) -> Any:
    if typing.get_origin(hint) is tuple:
        return _check_list(name, value, where)
    kinds, nullable = _allowed(hint)
    if value is None:
        if nullable:
            return None
        raise UserError(f"{where}: {name} must be set, not empty")
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise UserError(f"{where}: {name} must be {names}, not {type(value).__name__} {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{where}: {name} must be a finite number, not {value!r}")
    low, high = RANGES.get(name, (None, None))
    if (low is not None and value < low) or (high is not None and value > high):
        raise UserError(f"{where}: {name} must be between {low} and {high if high is not None else 'any'}, "
                        f"not {value!r}")
    if name in CHOICES and value not in CHOICES[name]:
        raise UserError(f"{where}: {name} must be one of {', '.join(map(str, CHOICES[name][1:]))}, not {value!r}")
    return value


def validate(settings: Settings, where: str = "settings") -> Settings:
    """Check every field's type and range (UserError naming the first bad one); returns settings,
    with list settings normalised (tuples of lower-case text)."""
    lists = {}
    for kind, obj in [(Settings, settings), *((k, getattr(settings, s)) for s, k in SECTIONS.items())]:
        for name, hint in _hints(kind).items():
            if name not in SECTIONS:
                value = _check(name, getattr(obj, name), hint, where)
                if typing.get_origin(hint) is tuple and value != getattr(obj, name):
                    lists[name] = value
    return settings.replace(**lists) if lists else settings


def _parse_env(raw: str, hint: Any, name: str) -> Any:
    if typing.get_origin(hint) is tuple:
        return raw
    kinds, nullable = _allowed(hint)
    text = raw.strip()
    if text == "" and nullable:
        return None
    if bool in kinds:
        if text.lower() in {"1", "true", "yes", "on"}:
            return True
        if text.lower() in {"0", "false", "no", "off"}:
            return False
        raise UserError(f"SHAPSTACK_{name.upper()}: not a boolean: {raw!r}")
    for kind in (int, float):
        if kind in kinds:
            try:
                return kind(text)
            except ValueError:
                raise UserError(f"SHAPSTACK_{name.upper()}: not a{'n integer' if kind is int else ' number'}: "
                                f"{raw!r}") from None
    return raw


LOCAL_CONFIG = "shapstack.toml"


def unsafe_reason(path: Path) -> str | None:
    """Why an unnamed config file may not be trusted, or None: it must be a regular file (not a
    link) owned by the current user, and not writable by its group or others."""
    try:
        st = path.lstat()
    except OSError:
        return "cannot be read"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return "is owned by another user"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return "is writable by its group or others"
    return None


def _from_env(env: Mapping[str, str], name: str) -> str | None:
    """SHAPSTACK_<NAME>, or the contents of the file SHAPSTACK_<NAME>_FILE names."""
    key = f"SHAPSTACK_{name.upper()}"
    raw, path = env.get(key), env.get(key + "_FILE")
    if path is None:
        return raw
    if raw is not None:
        raise UserError(f"set {key} or {key}_FILE, not both")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{key}_FILE: cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    return text.removesuffix("\n").removesuffix("\r")


def _config_path(config: str | os.PathLike | None, env: Mapping[str, str]) -> Path | None:
    if config is not None or env.get("SHAPSTACK_CONFIG"):
        return Path(config or env["SHAPSTACK_CONFIG"])
    local = Path(LOCAL_CONFIG)
    if not local.exists() and not local.is_symlink():
        return None
    problem = unsafe_reason(local)
    if problem:
        log.warning("settings: ignoring %s: it %s (name it with --config to use it)", local.resolve(), problem)
        return None
    return local


def _read_config(path: Path) -> dict[str, Any]:
    """The file's settings as {name: value}, tables flattened (names are unique across sections)."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"cannot read config file {path}: {exc}") from None
    log.info("settings: reading config file %s", path.resolve())
    data = dict(data.get("shapstack", data))
    for section in SECTIONS:
        table = data.pop(section, {})
        if not isinstance(table, dict):
            raise UserError(f"{path}: [{section}] must be a table")
        unknown = sorted(set(table) - {f.name for f in fields(SECTIONS[section])})
        if unknown:
            raise UserError(f"unknown setting(s) in [{section}] of {path}: {', '.join(unknown)}")
        data.update(table)
    unknown = sorted(set(data) - set(_names()))
    if unknown:
        raise UserError(f"unknown setting(s) in {path}: {', '.join(unknown)}")
    return data


def _names() -> dict[str, tuple[str | None, Any]]:
    """Every setting's name -> (its section or None, its type hint)."""
    out: dict[str, tuple[str | None, Any]] = {n: (None, h) for n, h in _hints(Settings).items() if n not in SECTIONS}
    for section, kind in SECTIONS.items():
        out.update({n: (section, h) for n, h in _hints(kind).items()})
    return out


def load_settings(
    config: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Build the settings from file, environment and overrides; raises UserError on bad values."""
    env = os.environ if env is None else env
    names = _names()
    path = _config_path(config, env)
    values = _read_config(path) if path is not None else {}
    for name, (_, hint) in names.items():
        raw = _from_env(env, name)
        if raw is not None:
            values[name] = _parse_env(raw, hint, name)
        if name in values:
            _check(name, values[name], hint, f"SHAPSTACK_{name.upper()}" if raw is not None else str(path))
    top = {k: v for k, v in values.items() if names[k][0] is None}
    for section, kind in SECTIONS.items():
        top[section] = kind(**{k: v for k, v in values.items() if names[k][0] == section})
    return Settings(**top).replace(**overrides)
