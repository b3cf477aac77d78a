"""The pure core: records, feeds, models, MM-SHAP, stacking, collapse metrics, the in-process runner.

Knows nothing of Celery, SQL or Triton; the adapters (db/, workers/, serving/, the CLI) call it.
"""
