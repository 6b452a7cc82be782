"""lmdistill: distill a large causal language model (the teacher) into a smaller one (the student).

Quick start (CPU, a few minutes, no downloads)::

    pip install -e . && lmdistill quickstart

The public loss API lives in :mod:`lmdistill.losses`; the data API in :mod:`lmdistill.data`.
"""

__version__ = "0.1.0"
