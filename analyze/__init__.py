"""Stage 2: concept libraries, sparse interpretable heads, IIS and correlation tables, on Dask.

Never imports :mod:`iis.extract`; it reads the stores that stage 1 writes (see ``iis.analyze.store``).
"""
