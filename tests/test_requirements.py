"""What a fresh machine needs is written down: every third-party package that the product's top-level
.py files and the tests import (at module level or inside a function) is named by requirements.txt,
requirements-dev.txt or a `pip install` line of .ci/run, so the README's two install commands are enough."""
import ast
import glob
import os
import re
import sys

from conftest import ROOT

# import name -> the package that provides it, where they differ
PACKAGE_OF = {"PIL": "pillow", "imageio_ffmpeg": "imageio-ffmpeg", "cdfvd": "cd-fvd", "cv2": "opencv-python",
              "yaml": "pyyaml", "sklearn": "scikit-learn", "skimage": "scikit-image"}
# imported only to be compared against when installed (bench_data.py's `installed` check); never needed
OPTIONAL = {"decord", "cv2"}
REQUIREMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*([<>=!~]=?\S*)?")


def normalize(name):
    """A package name as pip compares them (PEP 503): case and runs of -_. do not matter."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(spec):
    """'torch>=2.1' -> 'torch'; 'av>=12' -> 'av'."""
    return normalize(re.split(r"[\s<>=!~;\[@]", spec.strip(), maxsplit=1)[0])


def requirements_file(path):
    """The package names of a requirements file, following its `-r` includes."""
    names = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line.startswith("-r"):
                names |= requirements_file(os.path.join(os.path.dirname(path), line[2:].strip()))
            elif line and not line.startswith("-"):
                names.add(requirement_name(line))
    return names


def ci_installs(path):
    """The package names that a shell script's pip installs (words after `install` or its `pip_install`
    function that read as requirements; the files after -r followed)."""
    names = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            words = line.split("#", 1)[0].split()
            starts = [i for i, word in enumerate(words) if word in ("install", "pip_install")]
            rest = words[starts[0] + 1:] if starts else []
            for before, word in zip([None] + rest, rest):
                if before == "-r":
                    names |= requirements_file(os.path.join(ROOT, word))
                elif REQUIREMENT.fullmatch(word):
                    names.add(requirement_name(word))
    return names


def declared():
    return (requirements_file(os.path.join(ROOT, "requirements.txt"))
            | requirements_file(os.path.join(ROOT, "requirements-dev.txt"))
            | ci_installs(os.path.join(ROOT, ".ci", "run")))


def imported(path):
    """{top-level name of every absolute import in the file, `pytest.importorskip("x.y")` included}."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "importorskip"
              and node.args and isinstance(node.args[0], ast.Constant)):
            names.add(node.args[0].value.split(".")[0])
    return names


def undeclared(files, packages):
    """['file: imports X, but no requirements file or .ci/run installs package Y'] for every third-party
    import of `files` whose package is not in `packages`."""
    local = {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ROOT, "*.py"))
             + glob.glob(os.path.join(ROOT, "tests", "*.py"))}
    problems = []
    for path in files:
        for name in sorted(imported(path) - local - OPTIONAL - set(sys.stdlib_module_names)):
            package = PACKAGE_OF.get(name, name)
            if normalize(package) not in packages:
                problems.append(f"{os.path.relpath(path, ROOT)}: imports {name}, but no requirements file or "
                                f".ci/run installs package {package}")
    return problems


def project_files():
    return sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "tests", "*.py")))


def test_every_imported_package_is_installed_by_the_requirements_or_ci():
    problems = undeclared(project_files(), declared())
    assert not problems, "\n".join(problems)


def test_the_check_sees_imports_at_any_depth_under_their_package_names(tmp_path):
    """A check that reads nothing would pass too: here it must name what is missing, and map PIL to pillow."""
    script = tmp_path / "script.py"
    script.write_text("import os\nimport numpy\nfrom PIL import Image\n\n\ndef f():\n    import scipy.ndimage\n"
                      "    import conftest\n    pytest.importorskip('cdfvd.third_party')\n")
    assert undeclared([str(script)], {"numpy", "pillow", "scipy", "cd-fvd"}) == []
    problems = undeclared([str(script)], {"numpy"})
    assert [p.split(": ", 1)[1] for p in problems] == [
        f"imports {name}, but no requirements file or .ci/run installs package {package}"
        for name, package in (("PIL", "pillow"), ("cdfvd", "cd-fvd"), ("scipy", "scipy"))]


def test_ci_installs_torch_requirements_and_cd_fvd():
    """The parse of .ci/run finds its three install lines (else the first test could pass on nothing)."""
    names = ci_installs(os.path.join(ROOT, ".ci", "run"))
    assert {"torch", "cd-fvd", "pytest", "diffusers", "numpy"} <= names
