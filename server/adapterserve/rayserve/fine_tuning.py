"""Fine-tuning jobs on Ray Serve: the launcher the ingress's job runner uses
(finetuning/launchers.py has the local one), and the Ray task it starts.

`train_in_task` runs on a Ray worker with CPUs of its own, never in a serving replica. It
resolves the base on its node (the embedded model is prepared there from the PyPI
package, or `--base-model`), writes the training files it was sent, runs the jobs'
trainer as a process, and streams the trainer's reports back (a Ray streaming
generator); after the last step it sends the trained folder's files (an adapter: a few
MB), then the final report.

A cancel raises KeyboardInterrupt in the task: its `finally` kills the trainer's process
group, and the task ends.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

log = logging.getLogger(__name__)

# a trained adapter folder: its files by name (the trainer writes no sub-folders)
MAX_ARTIFACT_BYTES = 512 * 1024**2


def remote_trainer(threads: int):
    import ray

    return ray.remote(num_returns="streaming", num_cpus=threads, max_retries=0)(train_in_task)


def train_in_task(spec: dict, files: dict[str, bytes]):
    from adapterserve.base_model import resolve_base_model
    from adapterserve.finetuning.trainer import reports, start_process

    with tempfile.TemporaryDirectory(prefix="adapterserve-ft-") as work:
        folder = Path(work)
        spec = dict(spec)
        spec["base_path"] = str(resolve_base_model(Path(spec["base_model"]) if spec.get("base_model") else None,
                                                   Path(spec["models_dir"])))
        for role, data in files.items():
            (folder / f"{role}.jsonl").write_bytes(data)
            spec[role] = str(folder / f"{role}.jsonl")
        spec["out_dir"], spec["checkpoints_dir"] = str(folder / "out"), str(folder / "checkpoints")
        process = start_process(spec, folder, new_session=True)
        try:
            done = None
            for message in reports(process.stdout):
                if message.get("type") == "done":
                    done = message  # after the artifact
                    continue
                yield message
            process.wait()
            if process.returncode != 0 or done is None:
                yield {"type": "error", "message": (folder / "trainer.log").read_text(errors="replace")[-300:]}
                return
            yield {"type": "artifact", "files": {p.name: p.read_bytes() for p in Path(spec["out_dir"]).iterdir() if p.is_file()}}
            yield done
        finally:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def write_artifact(files: dict[str, bytes], out_dir: Path) -> None:
    """The trained folder's files, written on the ingress's machine (names checked: one
    plain name each, nothing outside `out_dir`)."""
    if sum(len(data) for data in files.values()) > MAX_ARTIFACT_BYTES:
        raise ValueError("the trained folder is larger than an adapter may be")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        if Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"the trained folder holds an unexpected file name {name!r}")
        (out_dir / name).write_bytes(data)


class RayTraining:
    def __init__(self, generator, out_dir: Path):
        self.generator, self.out_dir = generator, Path(out_dir)
        self.returncode: int | None = None
        self._failure = ""

    async def messages(self) -> AsyncIterator[dict]:
        last: dict = {}
        try:
            async for ref in self.generator:
                message = await ref
                if message.get("type") == "artifact":  # the trained folder's files, before "done"
                    write_artifact(message["files"], self.out_dir)
                    continue
                last = message
                yield message
        except Exception as exc:  # the task failed, or was cancelled: its reason
            self._failure = f"{type(exc).__name__}: {str(exc)[-300:]}"
            self.returncode = 1
            return
        self.returncode = 0 if last.get("type") == "done" else 1

    def kill(self) -> None:
        import ray

        try:
            ray.cancel(self.generator)  # a KeyboardInterrupt in the task, whose `finally` kills the trainer
        except Exception as exc:  # already finished
            log.debug("cancelling a training task: %s", exc)

    async def wait(self) -> int:
        return self.returncode if self.returncode is not None else 1

    def failure(self) -> str:
        return self._failure


class RayLauncher:
    """Trains in a Ray task on the cluster the replicas run on (the ingress is a Ray actor)."""

    where = "a Ray task"

    def __init__(self, settings):
        self.settings = settings

    async def start(self, spec: dict, folder: Path) -> RayTraining:
        (folder / "spec.json").write_text(json.dumps(spec))
        files = {role: Path(spec[role]).read_bytes() for role in ("training_file", "validation_file") if spec.get(role)}
        remote = {**spec, "base_path": None, "base_model": str(self.settings.base_model) if self.settings.base_model else None,
                  "models_dir": str(self.settings.models_dir),
                  "priority": "normal"}  # its CPUs are its own (Ray's resources), not what serving leaves
        generator = remote_trainer(self.settings.fine_tuning_threads).remote(remote, files)
        return RayTraining(generator, Path(spec["out_dir"]))
