"""Teachers: one interface (`Teacher.score(batch)` -> scores the loss reads block by block), several kinds.

    OnlineTeacher(model)                      a frozen HF model run on each micro-batch            (--teacher)
    CachedTeacher(TeacherCache(folder))       the offline top-k cache of `lmdistill cache-teacher` (--teacher_cache)
    CrossTokenizerTeacher(model, vocab)       a teacher that reads the data in its own tokenization (--cross_tokenizer)
    EnsembleTeacher([t1, t2], weights, mode)  several teachers as one (BabyLlama)                   (--teacher_weights)

Each kind registers itself (`lmdistill.teachers.registry`) with its options, capabilities, checks, dry-run shape
and how it is built; the imports below register them in this order (the order wrapping kinds fold teachers in).
"""

from lmdistill.teachers.base import Teacher
from lmdistill.teachers.online import OnlineTeacher  # noqa: I001 - registration order: leaves, then wrappers
from lmdistill.teachers.cache import CachedTeacher, TeacherCache, TopKTeacher, build_cache
from lmdistill.teachers.cross_tokenizer import CrossTokenizerTeacher
from lmdistill.teachers.ensemble import EnsembleTeacher

__all__ = ["CachedTeacher", "CrossTokenizerTeacher", "EnsembleTeacher", "OnlineTeacher", "Teacher", "TeacherCache", "TopKTeacher",
           "build_cache"]
