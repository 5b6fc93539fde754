"""The Python API: examples/stanford_dogs.ipynb executed as a user runs it (nbclient, ipykernel),
on generated images with random weights; and classify on a caller's own client."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from streams.embedded.samples import generate_dataset

from .conftest import REPO

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")


@pytest.mark.slow  # about a minute: a kernel, a cluster, the stack and a stream worker: `make test-slow` (CI runs both)
def test_the_example_notebook_runs_top_to_bottom(tmp_path: Path, monkeypatch):
    """Every cell runs without an error: the batch path, the report, the stream path."""
    notebook = nbformat.read(REPO / "examples" / "stanford_dogs.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")  # committed without outputs
    for name, value in {"VISIONSTREAM_EXAMPLE_MODEL": "resnet18", "VISIONSTREAM_EXAMPLE_WEIGHTS": "none", "VISIONSTREAM_EXAMPLE_COUNT": "12",
                        "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"}.items():
        monkeypatch.setenv(name, value)
    for name in [name for name in os.environ if name.startswith(("AWS_", "VISIONSTREAM_CLUSTER", "KAFKA_"))]:
        monkeypatch.delenv(name)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    text = {index: "".join(output.get("text", "") for output in cell.outputs) for index, cell in enumerate(notebook.cells) if cell.cell_type == "code"}
    assert any("13 images in" in out for out in text.values()), text  # 12 and one unreadable file
    assert any("13 of 13 images predicted by the stream" in out for out in text.values()), text
    assert not any("IProgress not found" in out for out in text.values()), text  # ipywidgets: the notebook extra's


def test_classify_on_the_callers_client_inside_a_running_loop_and_an_interruption_leaves_it_usable(tmp_path: Path, dask_cluster, dask_reach):
    from distributed import Client

    from inference import COLUMNS, accuracy_report, classify, iter_classify
    from inference.client.connection import client_security
    from inference.settings import ClusterSettings

    generate_dataset(tmp_path / "dogs", 5, bad_files=1)
    images = str(tmp_path / "dogs" / "Images")
    with Client(dask_cluster.scheduler_address, security=client_security(ClusterSettings(**dask_reach)), timeout=30) as client:

        async def in_a_notebook():  # Jupyter's loop is running while a cell calls classify
            return classify(images, client=client, model="resnet18", weights="none", progress=False)

        frame = asyncio.run(in_a_notebook())
        assert list(frame.columns) == list(COLUMNS) and len(frame) == 6
        loads = client.run(_model_loads)
        assert len(classify(images, client=client, model="resnet18", weights="none", progress=False)) == 6
        assert client.run(_model_loads) == loads  # the second call found the model resident: nothing loaded again
        assert str(frame["score"].dtype) == "Float64" and str(frame["match"].dtype) == "boolean"
        assert frame["error_stage"].notna().sum() == 1  # the unreadable file is a row, not an exception
        assert accuracy_report(frame).summary["images"] == 6
        rows = iter_classify(images, client=client, model="resnet18", weights="none", batch_size=1, progress=False)
        next(rows)
        rows.close()  # what an interrupt does: the batches in flight are cancelled
        assert client.submit(sum, [1, 2]).result(timeout=30) == 3
        processing = client.processing()
        assert not any(key for keys in processing.values() for key in keys if "visionstream-batch" in str(key))
        with pytest.raises(ValueError, match="batch_size"):
            classify(images, client=client, batch_size=0)


def _model_loads(dask_worker) -> dict[str, int]:
    from inference.worker.plugin import PLUGIN_PREFIX

    return {name: plugin.loads for name, plugin in dask_worker.plugins.items() if name.startswith(PLUGIN_PREFIX)}


SCRIPT = """
from inference import classify

df = classify(IMAGES, config=EXTRA, progress=False)
print(len(df), sorted(set(df["model"])), sorted(set(df["weights"])), sorted(int(size) for size in set(df["batch_size"])))
"""


def test_the_api_runs_from_a_script_without_a_main_guard_with_the_settings_the_commands_use(tmp_path: Path):
    """README's script form, pasted into a file as a script writer would (no main guard): the
    embedded cluster's workers do not run the script again (it hung, waiting for workers that
    failed to start), and the settings are VISIONSTREAM_CONFIG's with `config` on top."""
    import subprocess
    import sys

    generate_dataset(tmp_path / "dogs", 5)
    stack = tmp_path / "stack.yaml"
    stack.write_text("model:\n  name: resnet18\n  weights: none\n")
    extra = tmp_path / "extra.yaml"
    extra.write_text("batch:\n  size: 3\n")
    script = tmp_path / "api1.py"
    script.write_text(f"IMAGES = {str(tmp_path / 'dogs' / 'Images')!r}\nEXTRA = {str(extra)!r}\n" + SCRIPT)
    env = {name: value for name, value in os.environ.items() if not name.startswith(("AWS_", "VISIONSTREAM_CLUSTER", "KAFKA_"))}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env=env | {"VISIONSTREAM_CONFIG": str(stack), "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "5 ['resnet18'] ['none'] [2, 3]", done.stdout  # batches of 3: 3 and 2


def test_an_api_weights_error_names_the_keyword_not_the_command_option(tmp_path: Path, dask_cluster, dask_reach):
    from distributed import Client

    from inference import classify
    from inference.client.connection import client_security
    from inference.errors import WeightsUnavailable
    from inference.settings import ClusterSettings

    generate_dataset(tmp_path / "dogs", 2)
    with Client(dask_cluster.scheduler_address, security=client_security(ClusterSettings(**dask_reach)), timeout=30) as client:
        with pytest.raises(WeightsUnavailable) as caught:
            classify(str(tmp_path / "dogs" / "Images"), client=client, model="resnet18", weights=str(tmp_path / "gone.pt"), progress=False)
    assert 'weights="none"' in str(caught.value) and "--weights" not in str(caught.value)
