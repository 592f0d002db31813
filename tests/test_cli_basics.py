"""The cheap commands: instant, torch-free where they should be, scriptable with --json."""

import json
import subprocess
import sys

from click.testing import CliRunner

from edgeft import __version__
from edgeft.cli import main


def test_help_and_version_do_not_import_torch():
    code = ("import sys; from edgeft.cli import main\n"
            "for args in (['--help'], ['--version'], ['targets', 'list'], ['train', '--help'], ['export', '--help']):\n"
            "    try: main(args)\n"
            "    except SystemExit: pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "assert 'transformers' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_version():
    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output


def test_targets_json_and_show():
    r = CliRunner().invoke(main, ["targets", "list", "--json"])
    names = {t["name"] for t in json.loads(r.output)}
    assert "raspberry-pi-5-8gb" in names
    r = CliRunner().invoke(main, ["targets", "show", "raspberry-pi-zero-2w", "--json"])
    shown = json.loads(r.output)
    assert shown["ram_mb"] == 512 and shown["bytes_per_base_param"] < 1


def test_doctor_reports_what_can_run():
    r = CliRunner().invoke(main, ["doctor", "--json"])
    assert r.exit_code == 0
    d = json.loads(r.output)
    assert d["commands"]["train"] is True  # the test environment has the train extra
    assert d["onnxruntime"]["training_build"] is True
    assert d["torch"]["version"].startswith("2.13")


def test_plan_is_torch_free(tmp_path):
    """`edgeft plan` reads config.json and safetensors headers only."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "from edgeft.plan import plan_memory, device_shape\n"
            "from edgeft.targets import load_target\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
