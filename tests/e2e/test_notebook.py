"""``notebooks/quickstart.ipynb`` runs top to bottom on CPU and draws its plots inline.

The kernel is this interpreter (the project's .venv), through a kernel spec written to
a temporary ``JUPYTER_PATH`` entry: nothing has to be registered with Jupyter
beforehand, so the test works on a freshly built .venv.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from twodrl.metrics import round_metric_keys
from twodrl.tracking import read_metrics

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"
KERNEL = "twodrl-test-python"
# The notebook reads these: two rounds on a few prompts keep it to actor start-up time.
SMALL = "rounds=1 rollout.prompts_per_round=8 eval.num_prompts=4 task.sft_examples=64 scorer.rm_train_responses=64"


def _kernel_spec(root: Path) -> None:
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "twodrl (.venv)",
        "language": "python",
    }))


def test_quickstart_notebook_executes_with_inline_plots(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    _kernel_spec(tmp_path / "jupyter")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    run_dir = tmp_path / "run"
    monkeypatch.setenv("TWODRL_NOTEBOOK_OVERRIDES", SMALL)
    monkeypatch.setenv("TWODRL_NOTEBOOK_RUN_DIR", str(run_dir))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # the notebook starts its own local cluster

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb,
        kernel_name=KERNEL,
        timeout=1200,  # per cell; the first one starts every actor
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},  # as Jupyter would: cwd = notebooks/
    )
    client.execute()  # raises CellExecutionError naming the failing cell

    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    images = [o for c in code for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 2, "expected the per-aspect curves and the segment × aspect heatmap inline"
    for image in images:
        assert len(image["data"]["image/png"]) > 1000  # base64 of a real figure, not an empty canvas

    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1]
    assert all(k in rows[-1] for k in round_metric_keys())
