"""lmdistill: distill a large causal language model (the teacher) into a smaller one (the student).

Quick start (CPU, a few minutes, no downloads)::

    pip install -e . && lmdistill quickstart

Python API: `from lmdistill import distill, DistillConfig` (`lmdistill.api` also has `train(TrainConfig(...))`
and `cache_teacher(CacheTeacherConfig(...))`). The loss API lives in :mod:`lmdistill.losses`; the data API in
:mod:`lmdistill.data`; teachers (online, cached, ensembles) in :mod:`lmdistill.teachers`.
"""

__version__ = "0.1.0"

_API = ("CacheTeacherConfig", "DistillConfig", "TrainConfig", "cache_teacher", "distill")  # `train` is a subpackage
__all__ = list(_API)


def __getattr__(name: str):
    """The API loads on first use, so `import lmdistill` (and `lmdistill --help`) stays instant."""
    if name in _API:
        from lmdistill import api

        return getattr(api, name)
    raise AttributeError(f"module 'lmdistill' has no attribute '{name}'")
