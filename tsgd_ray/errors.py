"""The one base of every error a user can cause and fix, and how the CLI finds it.

A `UserError` ends `tsgd-ray` (and `python -m tsgd_ray`) with its message as one line on stderr and
exit code 2. Raised inside a Ray task, an actor or a Ray Train worker, it reaches the driver wrapped
(RayTaskError, Ray Train's TrainingFailedError); `find_user_error` unwraps it.
"""

from __future__ import annotations

from typing import Optional


class UserError(Exception):
    """An error the user can fix (config, data, storage, a missing or foreign artifact); the
    message says what and where in one line."""


def find_user_error(exc: BaseException, depth: int = 0) -> Optional[UserError]:
    """The UserError `exc` is or wraps (Ray task and actor errors, Ray Train worker and controller
    failures, `raise ... from`), else None. The result is the original exception, not Ray's
    dual-class copy, so its str() is the user's one-line message."""
    if depth > 8:
        return None
    inner: list[BaseException] = []
    cause = getattr(exc, "cause", None)  # ray.exceptions.RayTaskError
    if isinstance(cause, BaseException):
        inner.append(cause)
    inner += list(getattr(exc, "worker_failures", {}).values())  # ray.train WorkerGroupError
    # `raise ... from` only: a bug raised while handling a user error (__context__) stays a bug
    for name in ("controller_failure", "__cause__"):
        value = getattr(exc, name, None)
        if isinstance(value, BaseException):
            inner.append(value)
    for candidate in inner:
        found = find_user_error(candidate, depth + 1)
        if found is not None:
            return found
    if isinstance(exc, UserError) and not _is_ray_wrapper(exc):
        return exc
    return None


def _is_ray_wrapper(exc: BaseException) -> bool:
    return type(exc).__module__.startswith("ray.") or type(exc).__name__.startswith("RayTaskError")
