"""The Evidently workspace as a running `evidently ui` sees it."""

import json
import time
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from monitoring import workspace


class _MetadataSeen(FileSystemEventHandler):
    """What the UI's watcher does: read every project `metadata.json` it is told about."""

    def __init__(self) -> None:
        self.reads: list[str] = []

    def on_any_event(self, event: FileSystemEvent) -> None:
        path = Path(str(event.src_path))
        if path.name == "metadata.json" and event.event_type in ("created", "modified") and path.exists():
            self.reads.append(event.event_type)
            json.loads(path.read_text())  # a half-written file would fail here, as it kills the UI's watcher


def test_a_new_project_enters_a_watched_workspace_whole(tmp_path: Path) -> None:
    ws = tmp_path / "workspace"
    ws.mkdir()
    seen = _MetadataSeen()
    observer = Observer()
    observer.schedule(seen, str(ws), recursive=True)
    observer.start()
    try:
        _, created = workspace.project(ws, "classifier")
        _, generator = workspace.project(ws, "generator", generative=True)
        deadline = time.monotonic() + 5
        while len(seen.reads) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        observer.stop()
        observer.join()

    # Each project arrives complete (moved in, never written in place), with its dashboard, and nothing is left
    # beside the workspace.
    assert seen.reads == ["created", "created"]
    assert workspace.project(ws, "classifier")[1].id == created.id
    assert len(generator.dashboard.model().panels) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["workspace"]
