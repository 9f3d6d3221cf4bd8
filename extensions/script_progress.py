"""A script's generations (an X/Y/Z plot's cells, a prompt matrix's prompts, loopback's loops)
reported as the progress of the one job they run in.

Each generation times itself from zero; the user wants the whole job: which cell of how many,
the step within it, and the time left for every cell still to run. `ScriptProgress` hears both
the cells' step reports and the script's `report_progress(done, total)` and reports one
`Progress` per step on core's `ProgressClock` (the one home of the ETA): cells are its batches.
"""

from __future__ import annotations

from pipelines.core.progress import Progress, ProgressCallback, ProgressClock


class ScriptProgress:
    """The progress of a script's job, fed by its cells' step reports and its cell counts."""

    def __init__(self, on_progress: ProgressCallback | None):
        self.cells_done = 0
        self.cells_total = 1  # until the script says (report_progress); never below the cells seen
        self.steps_heard = 0  # step reports from the cell running now
        self.clock = ProgressClock(1, 1, on_progress, unit="Cell")

    def cells(self, done: int, total: int) -> None:
        """The script's `report_progress(done, total)`: `done` cells are finished (0: it is
        only saying how many there are). A cell that reported no steps while it ran (its work
        ran elsewhere, e.g. on a ZeroGPU worker) counts as one step of its own."""
        done = max(int(done), 0)
        self.cells_total = max(int(total), done, 1)
        self.clock.batch_count = self.cells_total
        if done > self.cells_done and self.steps_heard == 0:
            self.clock.step_done(done - 1, 1, steps=1)
        if done > self.cells_done:
            self.cells_done, self.steps_heard = done, 0

    def cell_step(self, progress: Progress | None) -> None:
        """A step report of the cell running now: its batches and passes are that cell's steps."""
        if progress is None:
            return
        self.steps_heard += 1
        self.clock.batch_count = max(self.cells_total, self.cells_done + 1)
        self.clock.step_done(self.cells_done, progress.batch_index * progress.steps + progress.step,
                             steps=progress.steps * progress.batch_count, preview=progress.preview)
