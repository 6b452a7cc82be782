"""Teacher kinds as registered parts: each kind is one class, in its own file, that declares

- its options (`declare(add)`: flags, which the CLI, recipe YAMLs and the Python API's config classes take),
- its capabilities (what it can do; the run's other parts ask for capabilities, never for kinds),
- its checks (`check(spec, values)`, before any model loads),
- its memory shape for `--dry_run` (`shape(spec, ctx)`) and how to build it (`build(spec, ctx)`).

    @register_teacher_kind
    class MyKind(TeacherKind):
        name, capabilities = "mine", frozenset({SCORES_NEW_TEXT})
        @staticmethod
        def declare(add): add("--my_teacher", action=Repeated, default=None, help="...")
        @classmethod
        def specs(cls, values): return [TeacherSpec(cls.name, ref, "--my_teacher") for ref in values["my_teacher"] or []]
        @classmethod
        def build(cls, spec, ctx): return MyTeacher(spec.ref)

A run's teachers are resolved in two passes over the registry: every kind names the teachers its options give
(`specs`), then the kinds that combine teachers (`wrap`: an ensemble, a cross-tokenizer teacher) fold that list,
in registration order, into one `TeacherSpec` tree. `capabilities_of(spec)` is what the tree can do (a wrapper can
do only what its members can).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

from lmdistill.config import Registry
from lmdistill.errors import LmdistillError

# What a teacher can do (the capabilities the run's parts ask for):
SCORES_NEW_TEXT = "scores_new_text"  # scores any token sequence: the student's replies (on-policy), held-out data
FULL_VOCABULARY = "full_vocabulary"  # every logit is exact (not only a stored top k, as a cache's)
HIDDEN_STATES = "hidden_states"  # gives its decoder layers' hidden states (feature distillation)
OWN_TOKENIZATION = "own_tokenization"  # reads the data in its own tokenization (another vocabulary)
STEPS_TOKENS = "steps_tokens"  # gives next-token logits one token at a time (sampling from a teacher-student mix)


@dataclass(frozen=True)
class TeacherSpec:
    """One teacher of the run, as resolved from the options: `kind` (a registry name), `ref` (a folder, a cache, a
    URL), the `flag` that named it, and what its kind keeps (`settings`, `members` for a kind that wraps others)."""

    kind: str
    ref: str = ""
    flag: str = ""
    adapter: str | None = None
    dtype: str | None = None
    members: tuple["TeacherSpec", ...] = ()
    settings: tuple[tuple[str, Any], ...] = ()

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.settings).get(key, default)

    @property
    def label(self) -> str:
        return f"{self.flag} {self.ref}".strip()

    def leaves(self) -> list["TeacherSpec"]:
        """The teachers that score (a wrapper's members, depth first), in order."""
        return [leaf for m in self.members for leaf in m.leaves()] if self.members else [self]


@dataclass
class BuildContext:
    """What a kind gets to build its teacher: the run's tokenizer, device, whether this is the main process, the
    number of teachers (names are `--teacher X` when there are several), and the already built members of a
    wrapping kind."""

    tokenizer: Any
    device: Any
    is_main: bool = True
    several: bool = False
    members: list = field(default_factory=list)
    loss_top_k: int | None = None  # the loss's top k (--top_k): a cache reads no more than it
    extra: dict[str, Any] = field(default_factory=dict)


class TeacherKind:
    """A kind of teacher (see the module docstring). Class attributes: `name`, `capabilities`, `lacks` (why it
    lacks a capability, in the user's terms, for the checks' messages) and `wraps` (it combines other teachers)."""

    name: ClassVar[str] = ""
    capabilities: ClassVar[frozenset[str]] = frozenset()
    lacks: ClassVar[Mapping[str, str]] = {}
    wraps: ClassVar[bool] = False

    @staticmethod
    def declare(add: Callable) -> None:
        """Add this kind's options (`add` is `parser.add_argument` of `lmdistill distill`)."""

    @classmethod
    def specs(cls, values: Mapping[str, Any]) -> list[TeacherSpec]:
        """The teachers of this kind that the options name (none by default)."""
        return []

    @classmethod
    def wrap(cls, specs: list[TeacherSpec], values: Mapping[str, Any]) -> list[TeacherSpec]:
        """A wrapping kind folds the teachers named so far into its own spec; others return them as they are."""
        return specs

    @classmethod
    def capabilities_for(cls, spec: TeacherSpec) -> frozenset[str]:
        """What this teacher can do: the kind's `capabilities`; a wrapper works it out from its members
        (`capabilities_of(member)`), a kind whose capabilities depend on the teacher (a cache's k) from the spec."""
        return cls.capabilities

    @classmethod
    def why_lacks(cls, spec: TeacherSpec, capability: str) -> str | None:
        """Why this teacher lacks `capability`, in the user's terms (default: the kind's `lacks`)."""
        return cls.lacks.get(capability)

    @classmethod
    def check(cls, spec: TeacherSpec, values: Mapping[str, Any]) -> None:
        """Checks that need no model (files, counts, option combinations this kind cannot serve)."""

    @classmethod
    def tokenizer_dir(cls, spec: TeacherSpec) -> str | None:
        """The folder of the tokenizer it scores with (compared with the run's), or None."""
        return None

    @classmethod
    def shape(cls, spec: TeacherSpec, ctx: BuildContext) -> list:
        """`lmdistill.models.shapes.TeacherShape`s for `--dry_run` (no weights loaded)."""
        return []

    @classmethod
    def build(cls, spec: TeacherSpec, ctx: BuildContext):  # pragma: no cover - interface
        """The `lmdistill.teachers.Teacher` of `spec` (a wrapper gets its members built in `ctx.members`)."""
        raise NotImplementedError


TEACHER_KINDS = Registry("teacher kind")  # a new version rebuilds the config classes made from the options
register_teacher_kind, unregister_teacher_kind = TEACHER_KINDS.register, TEACHER_KINDS.unregister


def kind_of(spec: TeacherSpec) -> type[TeacherKind]:
    return TEACHER_KINDS.part(spec.kind)


def capabilities_of(spec: TeacherSpec) -> frozenset[str]:
    """What the teacher (tree) can do (`TeacherKind.capabilities_for`)."""
    return kind_of(spec).capabilities_for(spec)


def members_have(spec: TeacherSpec, capability: str) -> frozenset[str]:
    """`{capability}` when every member of a wrapper has it, else nothing (for `capabilities_for` of wrappers)."""
    return frozenset({capability}) if all(capability in capabilities_of(m) for m in spec.members) else frozenset()


def why_not(spec: TeacherSpec, capability: str) -> str | None:
    """None when the teacher (tree) has `capability`; else why not, in the user's terms: the wrapper's own reason
    when its kind gives one, else the first member's that lacks it."""
    if capability in capabilities_of(spec):
        return None
    own = kind_of(spec).why_lacks(spec, capability)
    if own is not None or not spec.members:
        return own or f"a {spec.kind} teacher cannot"
    return next(r for r in (why_not(m, capability) for m in spec.members) if r is not None)


def resolve_teachers(values: Mapping[str, Any]) -> TeacherSpec | None:
    """The run's teacher as one spec tree (None when the options name no teacher)."""
    specs: list[TeacherSpec] = []
    for kind in TEACHER_KINDS.values():
        specs += kind.specs(values)
    for kind in TEACHER_KINDS.values():
        if kind.wraps:
            specs = kind.wrap(specs, values)
    if len(specs) > 1:  # pragma: no cover - the ensemble kind folds several teachers
        raise LmdistillError(f"{len(specs)} teachers and no kind combines them.")
    return specs[0] if specs else None


def check_teacher(spec: TeacherSpec, values: Mapping[str, Any]) -> None:
    """Every kind's checks over the tree, members first."""
    for member in spec.members:
        check_teacher(member, values)
    kind_of(spec).check(spec, values)


def build_leaves(spec: TeacherSpec, ctx: BuildContext) -> list:
    """The scoring teachers of the tree (models loaded, caches opened), one after the other, in order."""
    return [kind_of(leaf).build(leaf, ctx) for leaf in spec.leaves()]


def assemble(spec: TeacherSpec, ctx: BuildContext, leaves: list):
    """The Teacher of the tree from its built leaves (consumed in order): each wrapper built over its members."""
    if not spec.members:
        return leaves.pop(0)
    members = [assemble(m, ctx, leaves) for m in spec.members]
    return kind_of(spec).build(spec, BuildContext(**{**ctx.__dict__, "members": members}))


def teacher_shapes(spec: TeacherSpec | None, ctx: BuildContext) -> list:
    """The `TeacherShape`s of every scoring teacher of the tree, for `--dry_run`."""
    if spec is None:
        return []
    if spec.members:
        return [s for m in spec.members for s in teacher_shapes(m, ctx)]
    return kind_of(spec).shape(spec, ctx)


def declare_teacher_options(add: Callable) -> None:
    """Every registered kind's options, in registration order."""
    for kind in TEACHER_KINDS.values():
        kind.declare(add)
