"""The Evidently workspace: every report and every decision, so `evidently ui --workspace DIR` plots them over time."""

from __future__ import annotations

import os
import shutil
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
from evidently import DataDefinition, Dataset, Report
from evidently.core.report import Snapshot
from evidently.metrics import MeanValue
from evidently.sdk.panels import PanelMetric, line_plot_panel
from evidently.ui.workspace import Project, Workspace

DECISION_COLUMNS = ("rows", "drift", "retrain", "macro_f1", "rate_gap", "f1_gap")
GENERATION_COLUMNS = ("control_accuracy", "mean_rating", "control_gap", "truncated_share", "empty_share")


def _drift(column: str, legend: str) -> PanelMetric:
    return PanelMetric(legend=legend, metric="ValueDrift", metric_labels={"column": column})


def _decision(column: str) -> PanelMetric:
    return PanelMetric(legend=column, metric="MeanValue", metric_labels={"column": column}, tags=["decision"])


def _panels(generative: bool) -> list[Any]:
    drift, decision = _drift, _decision
    if generative:
        return [
            line_plot_panel(
                "Prompt drift", [drift(c, c) for c in ("prompt", "length", "words", "url_share", "mention_share")]
            ),
            line_plot_panel(
                "Drift of the generations",
                [drift(c, c.removeprefix("g_")) for c in ("g_length", "g_words", "g_repetition")],
            ),
            line_plot_panel("Decisions (1 = yes)", [decision("drift"), decision("retrain")], size="half"),
            line_plot_panel("Control, feedback and bias", [decision(c) for c in GENERATION_COLUMNS], size="half"),
        ]
    return [
        line_plot_panel(
            "Drift scores",
            [drift("text", "text"), drift("prediction", "predicted label"), drift("confidence", "confidence")],
        ),
        line_plot_panel("Descriptor drift", [drift(d, d) for d in ("length", "words", "url_share", "mention_share")]),
        line_plot_panel("Decisions (1 = yes)", [decision("drift"), decision("retrain")], size="half"),
        line_plot_panel(
            "Quality and bias", [decision("macro_f1"), decision("f1_gap"), decision("rate_gap")], size="half"
        ),
    ]


def project(workspace_dir: str | Path, name: str, generative: bool = False) -> tuple[Workspace, Project]:
    """The workspace and the model's project, created with its dashboard (a classifier's or a generator's) on
    first use.

    A new project is written in a folder beside the workspace and moved in whole: a running `evidently ui` watches
    the workspace, and a `metadata.json` it reads half-written stops its watcher for good (it then never lists
    another project)."""
    workspace = Workspace(str(workspace_dir))
    found = workspace.search_project(name)
    if found:
        return workspace, found[0]
    target = Path(workspace_dir).resolve()
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))  # same file system: a rename
    try:
        created = Workspace(str(staging)).create_project(
            name, description=f"Monitoring of the registered model '{name}'"
        )
        for panel in _panels(generative):
            created.dashboard.add_panel(panel)
        os.rename(staging / str(created.id), target / str(created.id))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    workspace = Workspace(str(workspace_dir))
    return workspace, workspace.get_project(created.id)


def decision_snapshot(values: dict[str, float | None], verdict: str, reason: str, at: datetime) -> Snapshot:
    """A one-row report of the decision's numbers: the workspace keeps decisions beside the drift reports."""
    present = {k: float(v) for k, v in values.items() if v is not None}
    frame = pd.DataFrame([present])
    definition = DataDefinition(numerical_columns=list(present))
    report = Report(
        [MeanValue(column=c) for c in present],
        metadata={"verdict": verdict, "reason": reason},
        tags=["decision", verdict],
    )
    return report.run(Dataset.from_pandas(frame, definition), None, timestamp=at)


def add(workspace_dir: str | Path, name: str, snapshots: list[Snapshot], generative: bool = False) -> str:
    """Add the snapshots to the model's project; returns the project id."""
    workspace, proj = project(workspace_dir, name, generative)
    for snapshot in snapshots:
        workspace.add_run(proj.id, snapshot, include_data=False)
    return str(proj.id)
