"""Nothing a user can trigger ends in a traceback, and no test can pass on one by accident."""

import os

import pytest

from conftest import run, target, write_jsonl


def boom(*args, **kwargs):
    raise ValueError("boom: an internal bug")


# -- the test helper ----------------------------------------------------------
def test_run_helper_fails_on_an_exception_inside_a_command(monkeypatch):
    monkeypatch.setattr("edgeft.targets.list_targets", boom)
    with pytest.raises(AssertionError, match=r"(?s)raised ValueError.*Traceback.*boom: an internal bug"):
        run("targets", "list")
    monkeypatch.undo()
    assert run("targets", "list").exit_code == 0  # and passes when nothing is raised


def test_run_helper_fails_on_the_tidy_internal_error_too(monkeypatch, tmp_path):
    """With EDGEFT_DEBUG unset (a user's shell) the bug becomes exit 1 and one line: still a failed test."""
    monkeypatch.delenv("EDGEFT_DEBUG")
    monkeypatch.setenv("EDGEFT_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setattr("edgeft.targets.list_targets", boom)
    with pytest.raises(AssertionError, match="internal error"):
        run("targets", "list")


# -- the CLI's last resort: one line, exit 1, a log -----------------------------
def test_an_unexpected_error_is_one_line_and_a_log(monkeypatch, tmp_path):
    monkeypatch.delenv("EDGEFT_DEBUG")
    monkeypatch.setenv("EDGEFT_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setattr("edgeft.targets.list_targets", boom)
    r = run("targets", "list", internal_ok=True)
    assert r.exit_code == 1 and "Traceback" not in r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert lines[0] == "Error: internal error: ValueError: boom: an internal bug", r.output
    logs = list((tmp_path / "logs").glob("internal-*.log"))
    assert len(logs) == 1 and str(logs[0]) in r.output
    text = logs[0].read_text()
    assert "Traceback (most recent call last)" in text and "list_targets" in text and "boom: an internal bug" in text


def test_a_missing_optional_library_is_still_a_resource_error(monkeypatch):
    err = ModuleNotFoundError("No module named 'onnxruntime'", name="onnxruntime")
    monkeypatch.setattr("edgeft.targets.list_targets", lambda: (_ for _ in ()).throw(err))
    r = run("targets", "list")
    assert r.exit_code == 7 and 'pip install "edgeft[device]"' in r.output


# -- export: an internal failure names the model, the stage and the log ----------
def test_an_internal_export_failure_is_one_error_with_a_log(tmp_path, cls_run, monkeypatch):
    import edgeft.workstation.export as export

    def failing_generate(*args, **kwargs):
        with export.quiet_native_stderr():  # as ORT's C++ builder fails: native stderr first, then the exception
            os.write(2, b"2099-01-01 [E:onnxruntime:, graph.cc:1] native detail the user should not see\n")
            raise RuntimeError("gradient graph builder exploded")

    monkeypatch.delenv("EDGEFT_DEBUG")
    monkeypatch.setattr(export, "generate", failing_generate)
    out = tmp_path / "bundles" / "b"
    out.parent.mkdir()
    r = run("export", "--run", cls_run, "--target", target(tmp_path), "--out", out)
    assert r.exit_code == 10, r.output
    assert "Traceback" not in r.output and "native detail" not in r.output
    first = r.output.strip().splitlines()[0]
    assert first == ("Error: export of tiny-bert failed while generating the training graph (onnxruntime-training): "
                     "RuntimeError: gradient graph builder exploded"), r.output
    assert "edgeft doctor" in r.output  # what to try
    logs = list((out.parent / ".edgeft-logs").glob("export-*.log"))
    assert len(logs) == 1 and str(logs[0]) in r.output
    text = logs[0].read_text()
    assert "Traceback (most recent call last)" in text and "failing_generate" in text and "gradient graph builder exploded" in text
    assert "stage: generating the training graph" in text and "native detail the user should not see" in text
    assert not out.exists() and [p.name for p in out.parent.iterdir()] == [".edgeft-logs"]  # no bundle, no temp folder


def test_an_edgeft_error_in_export_passes_through_unchanged(tmp_path, cls_run, monkeypatch):
    from edgeft.errors import ExportError

    def explained(*args, **kwargs):
        raise ExportError("ONNX Runtime has no gradient for op Foo", "report the model")

    monkeypatch.delenv("EDGEFT_DEBUG")
    monkeypatch.setattr("edgeft.workstation.export.generate", explained)
    r = run("export", "--run", cls_run, "--target", target(tmp_path), "--out", tmp_path / "b")
    assert r.exit_code == 10 and r.output.startswith("Error: ONNX Runtime has no gradient for op Foo\n  hint: report the model"), r.output
    assert not (tmp_path / ".edgeft-logs").exists() and not (tmp_path / "b").exists()


def test_under_edgeft_debug_the_original_exception_propagates(tmp_path, cls_run, monkeypatch):
    monkeypatch.setattr("edgeft.workstation.export.generate", boom)
    with pytest.raises(AssertionError, match=r"(?s)raised ValueError.*boom: an internal bug"):
        run("export", "--run", cls_run, "--target", target(tmp_path), "--out", tmp_path / "b")
    assert not (tmp_path / "b").exists()


# -- the workstation's NaN loss is exit 13, as the device's ----------------------
def test_workstation_nan_loss_is_training_diverged(tmp_path, tiny_bert, sentiment_rows):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows)
    r = run("train", "--model", tiny_bert, "--data", data, "--task", "classify", "--out", tmp_path / "run", "--max-steps", 6,
            "--batch-size", 4, "--lr", 1e30, "--quiet")
    assert r.exit_code == 13, r.output
    assert "the loss became nan at step 2" in r.output, r.output  # step 1's update (lr 1e30) overflows the weights
