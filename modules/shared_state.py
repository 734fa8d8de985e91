"""Job state shared by processing, the progress bar and the API (A1111's shared.state subset)."""
import threading
import time


class State:
    def __init__(self):
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.job = ""
        self.job_count = 0
        self.job_no = 0
        self.sampling_step = 0
        self.sampling_steps = 0
        self.interrupted = False
        self.skipped = False
        self.textinfo = None
        self.time_start = None
        self.id_live_preview = 0

    def begin(self, job: str = "(unknown)") -> None:
        self.reset()
        self.job = job
        self.time_start = time.time()

    def end(self) -> None:
        self.job = ""
        self.job_count = 0

    def interrupt(self) -> None:
        self.interrupted = True

    def skip(self) -> None:
        self.skipped = True

    def progress(self) -> float:
        """Fraction done of the current job, 0..1."""
        if self.job_count <= 0 or self.sampling_steps <= 0:
            return 0.0
        per_job = 1.0 / self.job_count
        return min(1.0, self.job_no * per_job + per_job * self.sampling_step / self.sampling_steps)
