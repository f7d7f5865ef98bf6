import json
import subprocess
import sys

from mutdet.cli import main


def test_version_and_help():
    out = subprocess.run([sys.executable, "-m", "mutdet", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("mutdet ")
    out = subprocess.run([sys.executable, "-m", "mutdet", "--help"], capture_output=True, text=True)
    for command in ("demo-data", "tile", "merge", "outputs"):
        assert command in out.stdout


def test_errors_are_one_clear_line_and_exit_2(tmp_path, caplog):
    assert main(["tile", "--config", str(tmp_path / "nope.yaml"), "--dataset", "d", "--split", "s",
                 "--out", str(tmp_path)]) == 2
    assert "config file not found" in caplog.text
    cfg = json.dumps({"datasets": {"d": {"root": str(tmp_path), "format": "dota", "classes": ["a"],
                                         "splits": {"train": {}}}}})
    caplog.clear()
    assert main(["tile", "--config", cfg, "--dataset", "d", "--split", "train", "--out", str(tmp_path / "o")]) == 2
    assert "image folder not found" in caplog.text
    caplog.clear()
    assert main(["tile", "--config", cfg, "--dataset", "d", "--split", "val", "--out", str(tmp_path / "o")]) == 2
    assert "no split named 'val'" in caplog.text
