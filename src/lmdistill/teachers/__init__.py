"""Teachers: one interface (`Teacher.score(batch)` -> scores the loss reads block by block), several sources.

    OnlineTeacher(model)                      a frozen HF model run on each micro-batch
    CachedTeacher(TeacherCache(folder))       the offline top-k cache of `lmdistill cache-teacher`
    EnsembleTeacher([t1, t2], weights, mode)  several teachers as one (BabyLlama)
"""

from lmdistill.teachers.base import Teacher
from lmdistill.teachers.cache import CachedTeacher, TeacherCache, TopKTeacher, build_cache
from lmdistill.teachers.ensemble import EnsembleTeacher
from lmdistill.teachers.online import OnlineTeacher

__all__ = ["CachedTeacher", "EnsembleTeacher", "OnlineTeacher", "Teacher", "TeacherCache", "TopKTeacher",
           "build_cache"]
