"""Gradient accumulation against the run's length: a run whose --gradient_accumulation_steps exceeds its
micro-batches would take no optimizer step (exit 0, the "trained" model byte-identical to its input), and the
micro-batches after the last full accumulation window are never applied (DeepSpeed counts micro-steps across
epochs, so only the run's end can leave a remainder). `check_accumulation` refuses the first before training
and returns the line that says the second.
"""

from __future__ import annotations

from dschat.runtime.errors import FlagError


def check_accumulation(micro_batches_per_epoch: int, epochs: int, accumulation: int,
                       flag: str = "--gradient_accumulation_steps") -> str | None:
    """Refuse (FlagError naming `flag`) a run that would take no optimizer step; the note saying how many of the
    last micro-batches are dropped, or None when the windows divide the run evenly (or it has no batches)."""
    total = micro_batches_per_epoch * epochs
    if total <= 0:  # no data at all: the data loaders say so
        return None
    steps, left = divmod(total, accumulation)
    per = f"{micro_batches_per_epoch} per epoch x {epochs} epoch{'s' if epochs != 1 else ''}"
    if steps == 0:
        raise FlagError(f"{flag} {accumulation} is more than the {total} micro-batches this run has on each rank "
                        f"({per}): no optimizer step would be applied, so nothing would be trained; use {flag} "
                        f"{total} or less, or more data or epochs")
    if left:
        return (f"note: {flag} {accumulation}: the last {left} of the run's {total} micro-batches per rank ({per}) "
                f"fill no accumulation window; their gradients are not applied ({steps} optimizer step{'s' if steps != 1 else ''})")
    return None
