"""A commit that cannot strand a folder (issue 23): a run killed at any step of RunFolder's commit (SIGKILL in
a forked child, or KeyboardInterrupt in process) leaves a folder that the same command completes or starts
again, and that --force (other settings) always recovers; a user's file beside the outputs is never touched,
and no temporary file is left outside the staging folder. Steps are the renames of the commit (journal,
moves, replaced entries, marker), counted by wrapping os.rename / os.replace."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anatomy_prune.errors import UserError
from anatomy_prune.runfolder import JOURNAL, MARKER, STAGING, RunFolder

OUTPUTS = ("plan.json", "metrics.json", "model")


class Stop(Exception):
    """Raised by the step counter instead of a signal (in process)."""


def job(out: Path, tag: str, force: bool = False) -> None:
    """A run that writes the three kinds of output a prune writes: two JSON files and a folder."""
    with RunFolder(out, "prune", {"tag": tag}, force=force) as rf:
        rf.write_json("plan.json", {"tag": tag})
        model = rf.stage_dir("model")
        (model / "weights.bin").write_bytes(tag.encode() * 100)
        (model / "config.json").write_text(json.dumps({"tag": tag}))
        rf.write_json("metrics.json", {"tag": tag, "accuracy": 0.5})


def commit_steps(out: Path, tag: str, force: bool) -> int:
    """How many renames the commit of `job` makes here (counted on a copy of the folder's state)."""
    calls = []
    real = os.rename, os.replace

    def count(fn):
        def inner(*a, **k):
            calls.append(a)
            return fn(*a, **k)
        return inner

    with_exit = RunFolder.__exit__

    def exit_(self, *a):
        os.rename, os.replace = count(real[0]), count(real[1])
        try:
            return with_exit(self, *a)
        finally:
            os.rename, os.replace = real

    RunFolder.__exit__ = exit_
    try:
        job(out, tag, force)
    finally:
        RunFolder.__exit__ = with_exit
    return len(calls)


def interrupted(out: Path, tag: str, force: bool, k: int, how: str) -> None:
    """Run `job` and stop it at the k-th rename of its commit: SIGKILL (a forked child) or an exception."""
    real = os.rename, os.replace
    state = {"n": 0, "on": False}

    def wrap(fn):
        def inner(*a, **kw):
            if state["on"]:
                state["n"] += 1
                if state["n"] == k:
                    if how == "kill":
                        os.kill(os.getpid(), signal.SIGKILL)
                    raise KeyboardInterrupt
            return fn(*a, **kw)
        return inner

    with_exit = RunFolder.__exit__

    def exit_(self, *a):
        state["on"] = a[0] is None
        return with_exit(self, *a)

    if how == "kill":
        pid = os.fork()
        if pid == 0:  # the child: killed at step k, or exits 0 when the commit has fewer steps
            try:
                RunFolder.__exit__ = exit_
                os.rename, os.replace = wrap(real[0]), wrap(real[1])
                job(out, tag, force)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) or os.WEXITSTATUS(status) == 0
        return
    RunFolder.__exit__ = exit_
    os.rename, os.replace = wrap(real[0]), wrap(real[1])
    try:
        job(out, tag, force)
    except KeyboardInterrupt:
        pass
    finally:
        os.rename, os.replace = real
        RunFolder.__exit__ = with_exit


def assert_complete(out: Path, tag: str, user: dict[str, bytes]) -> None:
    marker = json.loads((out / MARKER).read_text())
    assert marker["status"] == "complete" and marker["settings"] == {"tag": tag}
    assert sorted(marker["outputs"]) == sorted(OUTPUTS)
    assert json.loads((out / "plan.json").read_text()) == {"tag": tag}
    assert json.loads((out / "metrics.json").read_text())["tag"] == tag
    assert (out / "model" / "weights.bin").read_bytes() == tag.encode() * 100
    assert not (out / STAGING).exists()
    names = {p.name for p in out.iterdir()}
    assert names <= set(OUTPUTS) | {MARKER, ".anatomy-prune.lock"} | set(user), names
    for name, data in user.items():
        assert (out / name).read_bytes() == data
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


SCENARIOS = ("fresh", "replace", "beside-user-file")


def scenario(tmp: Path, kind: str) -> tuple[Path, dict, bool]:
    out = tmp / "out"
    user: dict[str, bytes] = {}
    if kind == "replace":
        job(out, "old")
    if kind == "beside-user-file":
        out.mkdir()
        user = {"notes.txt": b"the user's notes"}
        (out / "notes.txt").write_bytes(user["notes.txt"])
    return out, user, kind != "fresh"


@pytest.mark.parametrize("kind", SCENARIOS)
def test_a_commit_has_the_steps_counted_here(tmp_path, kind):
    out, user, force = scenario(tmp_path, kind)
    n = commit_steps(out, "new", force)
    assert n == (8 if kind == "replace" else 5)  # journal, 3 moves (+3 replaced entries), marker
    assert_complete(out, "new", user)


@pytest.mark.parametrize("how", ["kill", "interrupt"])
@pytest.mark.parametrize("kind", SCENARIOS)
@pytest.mark.parametrize("k", range(1, 9))
def test_killed_at_every_step_the_same_command_recovers(tmp_path, k, kind, how):
    out, user, force = scenario(tmp_path, kind)
    interrupted(out, "new", force, k, how)
    job(out, "new", force)
    assert_complete(out, "new", user)


@pytest.mark.parametrize("how", ["kill", "interrupt"])
@pytest.mark.parametrize("k", range(1, 9))
def test_killed_at_every_step_force_with_other_settings_recovers(tmp_path, k, how):
    out, user, _ = scenario(tmp_path, "replace")
    interrupted(out, "new", True, k, how)
    job(out, "third", force=True)
    assert_complete(out, "third", user)


def test_without_force_other_settings_are_refused_after_the_recovery(tmp_path):
    out, user, _ = scenario(tmp_path, "fresh")
    interrupted(out, "new", False, 3, "kill")
    with pytest.raises(UserError, match="other settings"):
        job(out, "third")
    assert_complete(out, "new", user)      # the decided commit was completed, nothing else changed


def test_a_clash_appearing_after_the_kill_is_refused_not_moved(tmp_path):
    """A user's file put at an output's name after the kill is never moved or deleted by the recovery."""
    out, user, _ = scenario(tmp_path, "fresh")
    interrupted(out, "new", False, 3, "kill")          # journal and plan.json done, metrics.json not
    assert (out / STAGING / JOURNAL).is_file()
    (out / "metrics.json").write_text("mine")
    with pytest.raises(UserError, match="not written by anatomy-prune"):
        job(out, "new")
    assert (out / "metrics.json").read_text() == "mine"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(k=st.integers(1, 9), kind=st.sampled_from(SCENARIOS), how=st.sampled_from(["kill", "interrupt"]),
       twice=st.booleans(), force_again=st.booleans())
def test_killed_at_random_points_recovers(tmp_path_factory, k, kind, how, twice, force_again):
    """Random kill points, sometimes a second kill during the recovering run: the last run always recovers."""
    tmp = tmp_path_factory.mktemp("commit")
    out, user, force = scenario(tmp, kind)
    interrupted(out, "new", force, k, how)
    if twice:
        interrupted(out, "new", force, max(1, k - 1), how)
    tag = "other" if force_again else "new"
    job(out, tag, force or force_again)
    assert_complete(out, tag, user)


def test_an_undecided_journal_is_a_stale_staging_folder(tmp_path):
    """A damaged journal (never written whole by anatomy-prune) means the commit was not decided."""
    out, user, _ = scenario(tmp_path, "fresh")
    interrupted(out, "new", False, 2, "kill")
    (out / STAGING / JOURNAL).write_text("{")
    job(out, "new")
    assert_complete(out, "new", user)
