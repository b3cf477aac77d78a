"""shapstack: product-catalogue classification with MM-SHAP-weighted stacking."""

__version__ = "0.1.0"
