"""The any_class mark (tests/conftest.py): CI's pinned passes skip a marked test, so the guard
must fail one that asks the precision policy, however it asks."""

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CASES = '''
import os, subprocess, sys
import pytest
from chipshift.devices import get_device

CPU = get_device("cpu")
ENV = dict(os.environ)  # captured before any test, as some test modules do

def test_unmarked_may_ask():
    CPU.precision.half_native()

@pytest.mark.any_class
def test_asks_a_policy_made_earlier():
    CPU.precision.half_native()

@pytest.mark.any_class
def test_makes_a_policy():
    get_device("cpu").precision

@pytest.mark.any_class
def test_starts_a_process_that_asks():
    code = "from chipshift.devices import get_device; get_device('cpu').precision"
    assert subprocess.run([sys.executable, "-c", code], env=ENV).returncode == 0

@pytest.fixture(scope="module")
def trained():
    return "a model"

@pytest.mark.any_class
def test_shares_a_fixture_that_may_ask(trained):
    pass

@pytest.mark.any_class
def test_asks_nothing(tmp_path):
    assert not list(tmp_path.iterdir())
'''


def test_the_guard_fails_every_way_of_asking(pytester):  # not any_class: its own run asks the policy
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makeini("[pytest]\nmarkers =\n    any_class: asks nothing of the precision policy\n")
    pytester.makepyfile(test_cases=CASES)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=3, errors=1)
    out = result.stdout.str()  # errors (a shared fixture) are reported before failures
    assert "test_shares_a_fixture_that_may_ask is marked any_class but uses shared fixtures ['trained']" in out
    for name in ("test_asks_a_policy_made_earlier", "test_makes_a_policy"):
        assert f"{name} is marked any_class but asked the precision policy" in out
    assert "CHIPSHIFT_HALF = 'marked-any-class'" in out  # the process it started
