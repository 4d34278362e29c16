"""Entry-point wrapper: expected failures become one clear line on stderr, not a library traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

from dschat.utils.args import FlagError
from dschat.utils.data.raw_datasets import DatasetError
from dschat.utils.loop import NonFiniteLossError
from dschat.utils.model.model_utils import ModelPathError

USER_ERRORS = (FlagError, DatasetError, ModelPathError, NonFiniteLossError)


def run_main(main: Callable[[], None]) -> None:
    """Call `main()`; a user error prints `error: <message>` and exits with status 2."""
    try:
        main()
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
