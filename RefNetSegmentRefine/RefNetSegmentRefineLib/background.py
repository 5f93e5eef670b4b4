"""A refinement running in a separate process, polled from the GUI and cancellable at any moment.

The pattern of SlicerMONAIAuto3DSeg's ``MONAIAuto3DSegLib/process.py``: the process is started with
``slicer.util.launchConsoleProcess`` (Slicer's startup environment, stdout and stderr merged), a thread
reads its output lines into a queue, and the Widget polls :meth:`BackgroundRefinement.poll` from a
timer. The work is ``python -m refnet.worker JOB_DIR`` on a job folder in Slicer's temporary path; the
scene is only touched by :meth:`BackgroundRefinement.result`, after the process succeeded.
"""

from __future__ import annotations

import os
import queue
import shutil
import sys
import tempfile
import threading

import slicer

from .dependencies import MODULE_DIR


def _python() -> str:
    """Slicer's Python launcher (PythonSlicer, as SlicerTotalSegmentator uses), else this interpreter."""
    return shutil.which("PythonSlicer") or sys.executable


class BackgroundRefinement:
    """Handle of one background refinement: ``poll()`` until True, then ``result()``; or ``cancel()``."""

    def __init__(self, logic, job, folder: str, process, guards) -> None:
        self.logic, self.job, self.folder, self.process, self.guards = logic, job, folder, process, guards
        self.done = self.total = 0
        self.error: str | None = None
        self.output: list[str] = []
        self._lines: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @classmethod
    def start(cls, logic, job, *, modelPath: str | None, device: str, guards) -> BackgroundRefinement:
        from refnet.worker import write_job

        folder = tempfile.mkdtemp(prefix="RefNetRefine_", dir=slicer.app.temporaryPath)
        try:
            write_job(folder, job.raw, job.affine, job.ct, model_path=modelPath, device=device, guards=guards)
            path = os.pathsep.join(p for p in (MODULE_DIR, os.environ.get("PYTHONPATH", "")) if p)
            process = slicer.util.launchConsoleProcess([_python(), "-u", "-m", "refnet.worker", folder],
                                                       updateEnvironment={"PYTHONPATH": path})
        except Exception:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return cls(logic, job, folder, process, guards)

    def _read(self) -> None:
        for line in self.process.stdout:
            self._lines.put(line.rstrip("\n"))

    def poll(self) -> bool:
        """Take in the output so far (progress, error); True once the process has ended and all was read."""
        from refnet.worker import parse_progress

        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
            progress = parse_progress(line)
            if progress:
                self.done, self.total = progress
            elif line.startswith("error: "):
                self.error = line[len("error: "):]
            elif line.strip():
                self.output.append(line)
        return self.process.poll() is not None and not self._reader.is_alive() and self._lines.empty()

    def cancel(self) -> None:
        """Stop the process now (with its children where psutil is there, as MONAIAuto3DSeg does); nothing is made."""
        try:
            import psutil

            for child in psutil.Process(self.process.pid).children(recursive=True):
                child.kill()
        except Exception:  # psutil missing or the process already gone
            pass
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)

    def result(self):
        """The :class:`RefineResult` of a finished run (the new node is built here, on the GUI thread).

        Raises:
            RuntimeError: the process failed; the message is the worker's.
        """
        from refnet.refine import RefineReport
        from refnet.worker import read_result

        try:
            if self.process.returncode != 0 or not os.path.exists(os.path.join(self.folder, "output.npz")):
                detail = self.error or "\n".join(self.output[-5:]) or f"exit status {self.process.returncode}"
                raise RuntimeError(f"The refinement process failed: {detail}")
            refined, report = read_result(self.folder)
            device = report.pop("device", "cpu")  # the worker adds where it ran to the report's fields
            return self.logic.finishRefinement(self.job, refined, RefineReport(**report), guards=self.guards,
                                               device=device)
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
