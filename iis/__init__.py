"""iis: the Inherent Interpretability Score pipeline. This package is the front door only:
the CLI and the pipelines.yaml schema. The work lives in :mod:`iis.extract` and :mod:`iis.analyze`."""

__version__ = "0.1.0"
