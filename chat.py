"""Chat with a trained actor: `python chat.py --path output/step3-models/builtin/actor` (see inference/chatbot.py)."""

import sys
from pathlib import Path

# Runnable from anywhere: the repo root holds both `inference` and the `dschat` package.
sys.path.insert(0, str(Path(__file__).resolve().parent))

try:
    from inference.chatbot import main  # noqa: E402
except KeyboardInterrupt:  # Ctrl-C while the libraries load: one line and 130, as at any later moment
    print("error: interrupted (Ctrl-C) while starting; nothing was written", file=sys.stderr)
    sys.exit(130)

if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C while the model loads (the session itself ends quietly on Ctrl-C)
        print("\nerror: interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
