"""The suite cleans up after itself (pytest keeps its last three runs' temporary folders): a module's
big files (conftest's module_tmp_path) go when the module is done, passed or failed, and a passed
test's tmp_path when it ends (pytest.ini's retention policy); a failed test's stays, to be looked at."""
import os
import shutil
import subprocess
import sys

from conftest import ROOT

FIRST = '''import os


def record(what, path):
    with open(os.environ["RECORD"], "a") as f:
        f.write(f"{what} {path}\\n")


def test_writes_a_big_file(module_tmp_path):
    (module_tmp_path / "big.bin").write_bytes(bytes(1000))
    record("module", module_tmp_path)


def test_passes(tmp_path):
    (tmp_path / "small.txt").write_text("x")
    record("passed", tmp_path)


def test_fails(module_tmp_path, tmp_path):
    (tmp_path / "small.txt").write_text("x")
    record("failed", tmp_path)
    assert False
'''
SECOND = '''import os


def test_the_first_modules_folder_is_gone_once_it_is_done():
    with open(os.environ["RECORD"]) as f:
        paths = dict(line.split(" ", 1) for line in f.read().splitlines())
    assert os.path.isfile(os.environ["RECORD"]) and not os.path.exists(paths["module"])
'''


def test_module_folders_and_passed_tests_tmp_paths_are_removed_failed_ones_kept(tmp_path):
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_first.py").write_text(FIRST)
    (tests / "test_second.py").write_text(SECOND)
    shutil.copy(os.path.join(ROOT, "pytest.ini"), tmp_path / "pytest.ini")
    record = tmp_path / "record.txt"
    # the project's conftest as a plugin: its module_tmp_path, with the project's pytest.ini
    env = dict(os.environ, RECORD=str(record), PYTHONPATH=os.path.join(ROOT, "tests"))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                             "--basetemp", str(tmp_path / "base"), str(tests)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    summary = result.stdout.strip().splitlines()[-1]
    assert "1 failed, 3 passed" in summary, result.stdout[-3000:] + result.stderr[-3000:]
    paths = dict(line.split(" ", 1) for line in record.read_text().splitlines())
    assert paths.keys() == {"module", "passed", "failed"}
    assert not os.path.exists(paths["module"]) and not os.path.exists(paths["passed"])
    assert os.path.isfile(os.path.join(paths["failed"], "small.txt"))
