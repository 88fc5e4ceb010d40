import json

import pytest

from anatomy_prune.cli import main

TINY_FT = ["--model", "tiny-bert", "--train-size", "16", "--val-size", "4", "--test-size", "4",
           "--max-length", "32", "--batch-size", "8"]


def test_finetune_writes_a_run_folder_and_reuses_it(tmp_path, tiny_csv, capsys):
    out = tmp_path / "run"
    assert main(["finetune", *TINY_FT, "--data", str(tiny_csv), "--out", str(out)]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["reused"] is False and first["steps"] == 2
    assert (out / "model" / "anatomy_prune.json").is_file() and (out / "finetune.json").is_file()
    mtime = (out / "model" / "model.safetensors").stat().st_mtime
    assert main(["finetune", *TINY_FT, "--data", str(tiny_csv), "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["reused"] is True
    assert (out / "model" / "model.safetensors").stat().st_mtime == mtime
    # other settings into the same folder: refused, folder untouched
    assert main(["finetune", *TINY_FT[:-2], "--batch-size", "4", "--data", str(tiny_csv), "--out", str(out)]) == 2
    assert "other settings" in capsys.readouterr().err
    # the run folder is a model spec for evaluate, whole user file
    js = tmp_path / "m.json"
    assert main(["evaluate", "--model", str(out), "--data", str(tiny_csv), "--json", str(js)]) == 0
    metrics = json.loads(js.read_text())
    assert metrics["n_eval"] == 24 and 0 <= metrics["accuracy"] <= 1 and metrics["latency_s"] > 0
    assert metrics["max_length"] == 32 and metrics["threads"] >= 1 and metrics["device"] == "cpu"


@pytest.mark.parametrize("args,msg", [
    (["finetune", *TINY_FT[2:], "--model", "no-such-alias"], "alias"),
    (["finetune", *TINY_FT[:-4], "--max-length", "100000"], "positions"),
    (["finetune", *TINY_FT, "--lr", "5"], "--lr"),
    (["evaluate", "--model", "tiny-bert"], "fine-tune it first"),
    (["evaluate", "--model", "/no/such/folder"], "does not exist"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, msg, tiny_csv):
    out = tmp_path / "run"
    argv = [*args, "--data", str(tiny_csv)] + (["--out", str(out)] if args[0] == "finetune" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1
    assert not out.exists()
    assert not any(p.name.startswith(".run") for p in tmp_path.iterdir())


def test_non_binary_labels_are_refused(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\ngood,1\nbad,3\n")
    assert main(["finetune", *TINY_FT, "--data", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "not binary" in capsys.readouterr().err


def test_help_for_every_subcommand(capsys):
    from anatomy_prune.cli import COMMANDS
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0
        assert "usage" in capsys.readouterr().out


def test_module_entry_point_runs():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "anatomy_prune", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "finetune" in out.stdout
