"""Where training metrics go: a JSONL log, TensorBoard (through accelerate's trackers) and a progress bar.

Contract: only the main process writes. `Tracker.log(entry)` appends one JSON object per line to
`OUTPUT/log.jsonl` (flushed at once, so a crash loses nothing already logged) and sends its numeric fields to the
accelerate trackers (TensorBoard when enabled). `Tracker.progress(...)` moves the bar (steps, with ETA) and shows
loss, tokens/s and learning rate, and after each eval the eval loss, image dependence and accuracy; `say` prints a
line without breaking the bar.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

LOG_FILE = "log.jsonl"


class Tracker:
    def __init__(self, accelerator: Any, output: Path, total_steps: int, start_step: int, show_bar: bool):
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.file = open(output / LOG_FILE, "a", encoding="utf-8") if self.main else None  # noqa: SIM115
        self.bar = None
        self.shown: dict[str, Any] = {}
        if self.main and show_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, desc="train")

    def log(self, entry: dict[str, Any]) -> None:
        if self.file is None:  # not the main process, or closed
            return
        self.file.write(json.dumps(entry) + "\n")
        self.file.flush()
        scalars = {k: v for k, v in entry.items() if isinstance(v, (int, float)) and k != "step"}
        if self.accelerator.trackers and "step" in entry:
            self.accelerator.log(scalars, step=entry["step"])

    def progress(self, steps: int = 1, **postfix: Any) -> None:
        if self.bar is None:
            return
        if postfix:  # merged: the eval's fields stay next to the latest training loss
            self.shown.update({k: v for k, v in postfix.items() if v is not None})
            self.bar.set_postfix(self.shown, refresh=False)
        self.bar.update(steps)

    def say(self, message: str, everywhere: bool = False) -> None:
        if not (self.main or everywhere):
            return
        if not self.main:
            message = f"[rank {self.accelerator.process_index}] {message}"
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        """Close the bar and the log file; safe to call twice."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.file is not None:
            self.file.close()
            self.file = None
