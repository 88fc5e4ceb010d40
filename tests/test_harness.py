"""The test harness itself: what `make test` relies on to keep the suite inside its time."""
import pytest


@pytest.mark.xdist_group("selfcheck")
def test_xdist_groups_take_effect(request):
    """`make test` places each xdist_group on one worker (a module fixture built once, a family's notebooks
    after its fine-tune). pytest-xdist 3.8 does that by renaming the test's node id, which pytest 9.2 ignores
    (requirements.txt pins 9.1.1): under --dist loadgroup the id must carry the group."""
    if not getattr(request.config.option, "loadgroup", False):   # set on a worker of --dist loadgroup
        pytest.skip("not run with --dist loadgroup")
    assert request.node.nodeid.endswith("@selfcheck"), "xdist_group is ignored: check the pytest / pytest-xdist pins"
