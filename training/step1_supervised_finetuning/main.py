"""Step 1: supervised fine-tuning of a causal LM on prompt + chosen answer (DeepSpeed-Chat flags).

The flags and the body live in dschat/cli/steps.py (`dschat sft` runs the same code); see --help.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

try:
    from dschat.cli.entry import run_main  # noqa: E402
    from dschat.cli.steps import parse_sft_args as parse_args  # noqa: E402, F401
    from dschat.cli.steps import sft_main as main  # noqa: E402
except KeyboardInterrupt:  # Ctrl-C while the libraries load: one line and 130, as at any later moment
    print("error: interrupted (Ctrl-C) while starting; nothing was written", file=sys.stderr)
    sys.exit(130)

if __name__ == "__main__":
    run_main(main)
