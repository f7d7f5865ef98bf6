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


def test_a_command_takes_every_setting_from_the_config_file(tmp_path):
    """Settings reach a stage from the config file the command is given, whatever section they sit in:
    the subset command gets `seed` and `fractions.nested` (once command-line flags the rule had to pass)."""
    from mutdet.data.fractions import fraction_subset

    (tmp_path / "images").mkdir()
    ids = [f"img{k:02d}" for k in range(10)]
    for image_id in ids:
        (tmp_path / "images" / f"{image_id}.png").write_bytes(b"")
    config = tmp_path / "config.yaml"
    for seed, nested in ((7, True), (8, False)):
        config.write_text(json.dumps({"seed": seed, "fractions": {"nested": nested}, "datasets": {"d": {
            "root": str(tmp_path), "format": "dota", "classes": ["a"], "splits": {"train": {}}}}}))
        out = tmp_path / f"frac-{seed}.txt"
        assert main(["subset", "--config", str(config), "--dataset", "d", "--split", "train", "--fraction", "0.3",
                     "--out", str(out)]) == 0
        expected = fraction_subset(ids, 0.3, seed=seed, nested=nested)
        assert [line for line in out.read_text().splitlines() if not line.startswith("#")] == list(expected.ids)
        assert f"# seed: {seed}" in out.read_text() and expected.method == ("permutation" if nested else "choice")


def test_a_second_process_on_the_same_output_fails_clearly(tmp_path, caplog):
    """Two runs sharing a results folder from different working directories (Snakemake locks per working
    directory) must not write one output at once: the second command stops, naming the first."""
    import os

    from mutdet.cli import OutputBusyError, exclusive_output

    out = tmp_path / "tiles"
    code = ("import sys, time; from pathlib import Path; from mutdet.cli import exclusive_output\n"
            "with exclusive_output(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        try:
            with exclusive_output(out):
                raise AssertionError("the lock was taken twice")
        except OutputBusyError as exc:
            assert f"mutdet pid {holder.pid}" in str(exc) and "two runs share this results folder" in str(exc)
        cfg = json.dumps({"datasets": {"d": {"root": str(tmp_path), "format": "dota", "classes": ["a"],
                                             "splits": {"train": {}}}}})
        assert main(["tile", "--config", cfg, "--dataset", "d", "--split", "train", "--out", str(out)]) == 2
        assert "OutputBusyError" in caplog.text and not out.exists()
    finally:
        holder.kill()
        holder.wait()
    with exclusive_output(out):  # released with its holder
        assert os.path.exists(tmp_path / ".tiles.lock")


def test_finetune_takes_the_jobs_seed(tmp_path, monkeypatch, capsys):
    """`mutdet finetune --seed N` (the workflow's {seed} wildcard) reaches the stage; without it the stage
    falls back to the config's seed; a seed that is not a non-negative integer is refused naming it."""
    import pytest

    from mutdet import cli

    seen = []
    monkeypatch.setattr(cli, "_stage", lambda name: type("Stage", (), {"run": staticmethod(
        lambda cfg, **kw: seen.append(kw["seed"]))}))
    cfg = json.dumps({"datasets": {"d": {"root": str(tmp_path), "format": "dota", "classes": ["a"],
                                         "splits": {"train": {}}}}})
    args = ["finetune", "--config", cfg, "--dataset", "d", "--epochs", "1", "--tiles", str(tmp_path),
            "--out", str(tmp_path / "o")]
    assert main([*args, "--seed", "7"]) == 0 and main(args) == 0 and seen == [7, None]
    for bad in ("-1", "x"):
        with pytest.raises(SystemExit) as exc:
            main([*args, "--seed", bad])
        assert exc.value.code == 2
        assert "--seed" in capsys.readouterr().err
