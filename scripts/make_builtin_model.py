"""Re-create the shipped builtin model directory (dschat/assets/tiny-llama) deterministically."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dschat.models.builtin import BUILTIN_MODEL_DIR, make_builtin_model  # noqa: E402

if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else BUILTIN_MODEL_DIR
    make_builtin_model(out)
    print(f"builtin model written to {out}")
