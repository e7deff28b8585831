"""Stage 1: run timm backbones over image datasets and cache their features in Zarr v3 stores.

Never imports :mod:`iis.analyze`; the two stages meet only in the store format (see ``iis.extract.store``).
"""
