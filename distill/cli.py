"""Exit statuses and error lines shared by the command-line entry points.

0: success. 1: the run failed a check (a parity gate, a diverged student) or an unexpected error
(disk full, a bug). 2: bad input (config, flags, paths, data, an output_dir in use or holding
another config's checkpoints, a checkpoint that does not verify). Errors are one ``error:`` line;
the traceback is printed only with ``--debug`` or ``CLIP_DISTILL_DEBUG=1``.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from typing import Callable, Sequence

from clipcore.paths import output_path_problem  # noqa: F401 - the entry points' check, re-exported

DEBUG_ENV = "CLIP_DISTILL_DEBUG"
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
# an OSError is bad input (a missing model, a path of the wrong kind) unless the machine failed
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ENOMEM, errno.EROFS}


def is_bad_input(exc: BaseException) -> bool:
    """ValueError: a wrong value; TypeError: a model of the wrong kind (clipcore.loading raises it for a
    model without image/text features); OSError: a missing model, file or dataset."""
    if isinstance(exc, OSError):
        return exc.errno not in ENVIRONMENT_ERRNOS
    return isinstance(exc, (ValueError, TypeError))


def debug_requested(argv: Sequence[str] | None) -> bool:
    args = sys.argv[1:] if argv is None else argv
    return "--debug" in args or os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")


def run_cli(main: Callable[[], object], debug: bool, failed: tuple[type[BaseException], ...] = ()) -> int:
    """Call ``main``; map what it raises to an exit status and one ``error:`` line on stderr.

    Args:
        failed: exceptions that mean "ran, and a check failed" (exit 1) even when they are ValueErrors.
    """
    try:
        main()
        return EXIT_OK
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every error becomes one line; --debug shows the rest
        if debug:
            traceback.print_exc()
        status = EXIT_FAILED if isinstance(exc, failed) or not is_bad_input(exc) else EXIT_BAD_INPUT
        unexpected = status == EXIT_FAILED and not isinstance(exc, failed)
        message = f"{type(exc).__name__}: {exc}" if unexpected else str(exc)
        hint = "" if debug or not unexpected else f" (rerun with --debug or {DEBUG_ENV}=1 for the traceback)"
        print(f"error: {' '.join(message.split(chr(10)))}{hint}", file=sys.stderr)
        return status
