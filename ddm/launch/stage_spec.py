"""``StageParts``: what ``ddm submit submit.stage=<stage>`` needs to know of a stage that runs as many jobs.

The rows themselves, one per stage, are in ``ddm.launch.stage_parts`` (the sample stage's in
``ddm.launch.sample_parts``). Nothing here imports torch.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ddm.artifacts import RunDir
from ddm.settings import Settings

MERGE = "merge"


def parts_of(setting) -> int:
    return 1 if setting is None else int(setting)


def every_part(cfg: Settings, rd: RunDir, parts: int) -> list[int]:
    return list(range(parts)) if parts > 1 else []


def all_done(cfg: Settings, rd: RunDir, ids: list[int], done: list[int]) -> bool:
    return set(ids) <= set(done)


@dataclass(frozen=True)
class StageParts:
    """One stage as jobs: which setting picks a task's share, how many there are, how a finished one is seen."""

    stage: str  # the `ddm` command, and the folder of its jobs' logs: logs/<stage>/
    part_key: str  # the override a task is started with: <part_key>=<task id>
    count_key: str | None  # the setting that says how many parts; None: one task per cluster
    workers_key: str | None  # the worker processes a job starts: local jobs side by side share the cores through
    # it; None: the job has none (its threads follow the plan's OMP_NUM_THREADS)
    gpu: bool  # its tasks (or the one job of a stage in one part) ask for the island's GPUs
    what: str  # what array task j does, for its script's header
    folder: Callable[[RunDir], Path]  # what the stage writes: started once it exists
    needs: Callable[[RunDir], str | None]  # what is missing before it can run, None: nothing
    count: Callable[[Settings, RunDir], int]  # the number of parts (encode: K), checked
    done: Callable[[Settings, RunDir, int], list[int]]  # the tasks done (of count parts)
    record: Callable[[RunDir, int, int], Path]  # a file task j of n leaves when it ends well
    records: str | None  # the glob, under the run, of the parts' own files: how many, when not given
    merge: bool = True  # a last job joins the parts
    ids: Callable[[Settings, RunDir, int], list[int]] = every_part  # the tasks to consider
    complete: Callable[[Settings, RunDir, list[int], list[int]], bool] | None = None  # (ids, done): nothing left
    # to start; None: once the output is there
    task_prefix: str = "part-"  # a task's log folder, logs/<stage>/<prefix><id padded to task_digits>
    task_digits: int = 4
    lock: Callable[[RunDir, int], Path] | None = None  # the folder whose lock.json a running task holds
    output_name: str = "manifest.json"  # the file the merge (or the one job) writes last in the stage's folder

    def output(self, rd: RunDir) -> Path | None:
        """The manifest the merge (or the one job) writes last in the stage's folder; None without a merge."""
        return self.folder(rd) / self.output_name if self.merge else None

    def is_complete(self, cfg: Settings, rd: RunDir, ids: list[int], done: list[int]) -> bool:
        return self.output(rd).exists() if self.complete is None else self.complete(cfg, rd, ids, done)

    @property
    def array_job(self) -> str:
        """The SLURM name of its array (``ddm.launch.naming``): ``prepare-parts``; ``encode``, without a merge."""
        return f"{self.stage}-parts" if self.merge else self.stage

    @property
    def final_name(self) -> str | None:
        """The SLURM name of the job that completes the stage (its merge): the stage's; None without a merge."""
        return self.stage if self.merge else None

    def final_job(self, parts: int) -> str | None:
        """The job that completes the stage: the ``merge`` of the parts, the stage itself in one part, or none."""
        if not self.merge:
            return None
        return MERGE if int(parts) > 1 else self.stage

    def task_job(self, task: int) -> str:
        """``part-0003`` or ``cluster-03``: a task's name and its log folder under ``logs/<stage>/``."""
        return f"{self.task_prefix}{int(task):0{self.task_digits}d}"

    def recorded_parts(self, rd: RunDir) -> int | None:
        """The number of parts the files of parts already there were written for, when they all agree."""
        if self.records is None:
            return None
        counts = {int(m.group(1)) for p in rd.root.glob(self.records) if (m := _OF.search(p.name))}
        return counts.pop() if len(counts) == 1 else None


_OF = re.compile(r"-of-(\d+)\.json$")
