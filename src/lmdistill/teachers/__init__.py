"""Teacher sources besides an online model: the offline top-k cache (`lmdistill cache-teacher`)."""

from lmdistill.teachers.cache import TeacherCache, TopKTeacher, build_cache

__all__ = ["TeacherCache", "TopKTeacher", "build_cache"]
