"""iis: the Inherent Interpretability Score pipeline.

The modules directly under ``iis`` are the front door: the command line (:mod:`iis.cli`), the
pipelines.yaml schema and where pipelines come from (:mod:`iis.config`), the unpacking of a
pipeline into explicit calls (:mod:`iis.jobs`), ``iis info``/``iis pipelines`` (:mod:`iis.info`,
:mod:`iis.catalog`), logging and progress (:mod:`iis.logs`, :mod:`iis.progress`), and the store
contract both stages share (:mod:`iis.store_format`). The work lives in :mod:`iis.extract`
(stage 1), :mod:`iis.analyze` (stage 2) and :mod:`iis.apps` (the report and the applications).
"""

__version__ = "0.1.0"
