"""The models a job runs: a bundle's backend (in-process torch or a Triton server) and its stacker.

The CLI, the embedded runner and the workers all build them here, so a run gets the same models
and the same MM-SHAP configuration in every mode.
"""

from __future__ import annotations

from pipeline.backend import InProcessBackend
from pipeline.bundle import Bundle
from pipeline.mmshap import MMShapConfig, mmshap_config_for
from pipeline.records import Limits


def make_backend(bundle: Bundle, *, triton_url: str | None, device: str, batch_size: int, limits: Limits):
    """A Triton client when triton_url is set, else the bundle's models in this process."""
    if triton_url:
        from serving.client import TritonBackend  # tritonclient: only where Triton is used

        return TritonBackend(triton_url, bundle, batch_size=batch_size, limits=limits)
    return InProcessBackend(bundle, device=device, batch_size=batch_size, limits=limits)


# A run's recorded MM-SHAP options and the Settings fields they carry. `classify --distributed`
# records them from its settings and every worker reads them back: one table, so that no choice
# reaches one side and not the other.
RUN_MMSHAP_OPTIONS = {"mmshap_budget": "mmshap_budget", "mmshap_mode": "mmshap_image_mode",
                      "mmshap_target_stderr": "mmshap_target_stderr", "mmshap_cap": "mmshap_cap",
                      "mmshap_players": "mmshap_players", "mmshap_method": "mmshap_method",
                      "mmshap_audit_fraction": "mmshap_audit_fraction"}


def mmshap_run_options(settings) -> dict:
    """The MM-SHAP choices of these settings as a run's recorded options (those not None)."""
    chosen = {key: getattr(settings, field) for key, field in RUN_MMSHAP_OPTIONS.items()}
    return {key: value for key, value in chosen.items() if value is not None}


def mmshap_for_run(manifest: dict, settings, options: dict | None = None) -> MMShapConfig:
    """A run's MM-SHAP configuration: what `shapstack classify` asked for it (options recorded on
    the run: mmshap_budget, mmshap_mode, ...), else the settings, else as the bundle was trained."""
    o = options or {}
    recorded = {field: o.get(key) for key, field in RUN_MMSHAP_OPTIONS.items()}
    return mmshap_config_for(manifest, settings.replace(**recorded))
