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
    assert (out / "model" / "model.safetensors").stat().st_mtime == mtime
    assert {p.name for p in out.iterdir() if not p.name.startswith(".anatomy-prune")} == {"model", "finetune.json"}
    assert (out / ".anatomy-prune.json").is_file()  # the run marker
    # the run folder is a model spec for evaluate, whole user file
    js = tmp_path / "m.json"
    assert main(["evaluate", "--model", str(out), "--data", str(tiny_csv), "--json", str(js)]) == 0
    assert json.loads(capsys.readouterr().out)["n_eval"] == 24
    metrics = json.loads(js.read_text())
    assert metrics["n_eval"] == 24 and 0 <= metrics["accuracy"] <= 1 and metrics["latency_s"] > 0
    assert metrics["max_length"] == 32 and metrics["threads"] >= 1 and metrics["device"] == "cpu"
    # --force: the other settings replace the run
    assert main(["finetune", *TINY_FT[:-2], "--batch-size", "4", "--data", str(tiny_csv), "--out", str(out),
                 "--force"]) == 0
    forced = json.loads(capsys.readouterr().out)
    assert forced["reused"] is False and forced["steps"] == 4
    assert json.loads((out / "finetune.json").read_text())["config"]["batch_size"] == 4


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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reviews.csv"]  # nothing else: no staging, no lock


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


# --- run folders (runfolder.RunFolder, what every command with --out writes through) ---------------

def test_run_folder_commits_on_success_only(tmp_path):
    from anatomy_prune import UserError
    from anatomy_prune.runfolder import RunFolder, read_json

    out = tmp_path / "a" / "b"
    with pytest.raises(RuntimeError), RunFolder(out, "job", {"x": 1}) as rf:
        rf.write_json("r.json", {"v": 1})
        assert not (out / "r.json").exists()                       # staged, not yet in place
        raise RuntimeError("boom")
    assert not (tmp_path / "a").exists()                            # the folders it made are gone again
    with RunFolder(out, "job", {"x": 1}) as rf:
        rf.write_json("r.json", {"v": 1})
        (rf.stage_dir("sub") / "f.txt").write_text("hi")
        with pytest.raises(UserError, match="not a valid output name"):
            rf.stage("../escape")
    assert {p.name for p in out.iterdir() if not p.name.startswith(".anatomy-prune")} == {"r.json", "sub"}
    marker = read_json(out / ".anatomy-prune.json")
    assert marker["status"] == "complete" and marker["outputs"] == ["r.json", "sub"] and marker["kind"] == "job"
    with RunFolder(out, "job", {"x": 1}) as rf:                      # the same job again: it may reuse
        assert rf.same_as_before and rf.existing("r.json") == out / "r.json"
    with pytest.raises(UserError, match="other settings"):
        RunFolder(out, "job", {"x": 2}).__enter__()
    with RunFolder(out, "job", {"x": 2}, force=True) as rf:          # --force replaces its own outputs
        rf.write_json("r.json", {"v": 2})
    assert read_json(out / "r.json") == {"v": 2} and (out / "sub" / "f.txt").is_file()
    (out / "mine.txt").write_text("a user's file")
    with pytest.raises(UserError, match="not written by anatomy-prune"), \
            RunFolder(out, "job", {"x": 2}, force=True) as rf:
        rf.write_text("mine.txt", "replaced?")
    assert (out / "mine.txt").read_text() == "a user's file"
    assert not (out / ".anatomy-prune-staging").exists() and read_json(out / "r.json") == {"v": 2}


def test_a_second_writer_is_refused_and_leaves_the_first_alone(tmp_path):
    """The lock (was .src_issues.md #2): a refused writer must not touch the running writer's staging."""
    from anatomy_prune import UserError
    from anatomy_prune.runfolder import RunFolder

    out = tmp_path / "run"
    with RunFolder(out, "job", {"x": 1}) as rf:
        rf.write_json("r.json", {"v": 1})
        with pytest.raises(UserError, match="another anatomy-prune run is writing"):
            RunFolder(out, "job", {"x": 1}).__enter__()              # the lock: one writer at a time
        assert (rf.staging / "r.json").is_file()                     # ...and the running one keeps its work
    assert (out / "r.json").is_file()


def test_run_folder_refuses_places_that_are_no_run_folder(tmp_path, monkeypatch):
    from anatomy_prune import UserError
    from anatomy_prune.runfolder import RunFolder, read_json

    monkeypatch.chdir(tmp_path)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "file.txt").write_text("x")
    for out, msg in ((".", "current or a parent"), ("..", "current or a parent"), ("", "empty"),
                     (str(tmp_path), "contains the current folder"), ("link", "symbolic link"),
                     ("file.txt", "not a folder"), (str(tmp_path.home()), "home folder")):
        with pytest.raises(UserError, match=msg):
            RunFolder(out, "job").__enter__()
    (tmp_path / "real" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        RunFolder("real", "job").__enter__()
    with RunFolder("real", "job", force=True) as rf:                 # --force only adds beside a user's files
        rf.write_json("r.json", {})
    assert sorted(p.name for p in (tmp_path / "real").iterdir() if not p.name.startswith(".anatomy-prune")) == [
        "notes.txt", "r.json"]
    with pytest.raises(UserError, match="plan file '.*' not found"):
        read_json(tmp_path / "none.json", "plan file")
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(UserError, match="not valid JSON"):
        read_json(tmp_path / "bad.json")
