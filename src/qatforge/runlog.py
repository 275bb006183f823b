"""Send a rule script's output and logging to the rule's ``log:`` file."""

from __future__ import annotations

import contextlib
import logging
import sys
import traceback
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def logged(smk) -> Iterator[logging.Logger]:
    """Redirect stdout/stderr of a Snakemake ``script:`` to its first log file.

    On error the traceback goes to the log and a one-line summary to the real stderr, so the
    Snakemake console names the failing job's cause.
    """
    path = Path(smk.log[0]) if len(smk.log) else None
    if path is None:
        yield logging.getLogger("qatforge")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    real_stderr = sys.stderr
    with open(path, "w", buffering=1) as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        logging.basicConfig(stream=f, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
        log = logging.getLogger("qatforge")
        try:
            yield log
        except BaseException as e:
            traceback.print_exc(file=f)
            print(f"qatforge: {type(e).__name__}: {e} (full log: {path})", file=real_stderr)
            raise
