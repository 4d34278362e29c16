"""Chat with a trained actor: `python chat.py --path output/step3-models/builtin/actor` (see inference/chatbot.py)."""

import sys
from pathlib import Path

# Runnable from anywhere: the repo root holds both `inference` and the `dschat` package.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from inference.chatbot import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
