"""Name -> student config registry (the built-in entries are registered on import)."""

from __future__ import annotations

from students.configs import BUILTIN_STUDENTS, BUILTIN_TEXT_STUDENTS, StudentConfig


class UnknownStudentError(ValueError):
    """A student name is not registered; the message lists the valid names."""


_REGISTRY: dict[str, StudentConfig] = {}


def register_student(cfg: StudentConfig, *, overwrite: bool = False) -> StudentConfig:
    """Add a named student config.

    Args:
        cfg: a :class:`ClipStudentConfig`, :class:`ImageStudentConfig` or :class:`TextStudentConfig`.
        overwrite: replace an entry of the same name instead of raising.

    Returns:
        ``cfg``, so the call can be used as an expression.

    Raises:
        ValueError: the name is taken and ``overwrite`` is False.
    """
    if cfg.name in _REGISTRY and not overwrite:
        raise ValueError(f"student {cfg.name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[cfg.name] = cfg
    return cfg


def list_students(kind: str | None = None) -> list[str]:
    """Sorted registered names, optionally only those of one kind (``"clip"``, ``"frozen_text"`` or ``"text"``)."""
    return sorted(name for name, cfg in _REGISTRY.items() if kind is None or cfg.kind == kind)


def get_student_config(name: str) -> StudentConfig:
    """The config registered under ``name``.

    Raises:
        UnknownStudentError: naming every registered student.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownStudentError(
            f"unknown student {name!r}; registered students: {', '.join(list_students())}"
        ) from None


for _cfg in (*BUILTIN_STUDENTS, *BUILTIN_TEXT_STUDENTS):
    register_student(_cfg)
