"""The README and docs/ name only flags and files that exist: every command they show (in a code
block or in `backticks`) is checked against the script's own `--help`, and every path into the
repository against the tree. The flags come from running `python X.py [sub-command] --help` once
per script (and sub-command), so the scripts need no change to be checked."""
import concurrent.futures
import fnmatch
import functools
import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT

README_LIMIT = 14_000  # bytes: the README is one screen or three; the measurements live in docs/
SCRIPTS = {"train.py", "sample.py", "evaluate.py", "bench.py", "bench_long.py", "train_image.py"}
SUB_COMMANDS = {"evaluate.py": ("videos", "t2v", "shapes", "sr", "i2v", "long")}
DEFAULT_SUB = {"evaluate.py": "shapes"}  # evaluate.py with no sub-command runs the demo's ablation table
REPO_PREFIXES = ("models/", "tests/", "docs/", "clip_vocab/", ".ci/")
RUNNERS = {"python", "python3", "torchrun"}


def doc_files():
    return ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))


def classify(text):
    """Per line of a text: "code" (in a fenced or indented code block), "python" (in a fenced block
    marked as Python source, which holds no commands), "fence" (a fence line) or "prose"."""
    kinds, fence, python_fence, prev_blank, in_indented = [], None, False, True, False
    for line in text.splitlines():
        stripped = line.strip()
        if fence:
            if stripped.startswith(fence):
                fence, kind = None, "fence"
            else:
                kind = "python" if python_fence else "code"
        elif stripped.startswith(("```", "~~~")):
            fence, python_fence = stripped[:3], stripped[3:].strip().lower() in ("python", "py", "pycon")
            in_indented, kind = False, "fence"
        else:
            in_indented = line.startswith("    ") and stripped != "" and (prev_blank or in_indented)
            kind = "code" if in_indented else "prose"
        prev_blank = stripped == ""
        kinds.append(kind)
    return kinds


def code_lines(text):
    """(line number, command line) of every line of a code block, `\\` continuations joined."""
    out, pending = [], None
    for n, (line, kind) in enumerate(zip(text.splitlines(), classify(text)), 1):
        if kind != "code":
            pending = None
            continue
        start, line = (pending[0], pending[1] + " " + line.strip()) if pending else (n, line.strip())
        if line.endswith("\\"):
            pending = (start, line[:-1].rstrip())
            continue
        pending = None
        out.append((start, line))
    return out


def backtick_spans(text):
    """(line number, contents) of every `inline code` span in the prose; a span may wrap a line."""
    spans, block = [], []  # block: the (number, line) of one run of prose lines
    for n, (line, kind) in enumerate(zip(text.splitlines() + [""], classify(text) + ["code"]), 1):
        if kind == "prose" and line.strip():
            block.append((n, line))
            continue
        if block:
            joined = "\n".join(line for _, line in block)
            for m in re.finditer(r"`([^`]+)`", joined):
                spans.append((block[0][0] + joined.count("\n", 0, m.start()), " ".join(m.group(1).split())))
        block = []
    return spans


def simple_commands(line):
    """The words of each simple command in a shell line (split at &&, ||, ;, |; # comments dropped);
    None where the line is not shell (an unbalanced quote)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        words = list(lexer)
    except ValueError:
        return None
    commands, current = [], []
    for w in words:
        if w in ("&&", "||", ";", "|", "&"):
            commands.append(current)
            current = []
        else:
            current.append(w)
    return commands + [current]


def script_call(words):
    """(script, sub-command or None, the words after them) of `python X.py ...` or `torchrun ... X.py ...`."""
    for i, w in enumerate(words):
        if os.path.basename(w) not in RUNNERS:
            continue
        rest = words[i + 1:]
        if rest[:1] in (["-m"], ["-c"]):
            return None
        for j, r in enumerate(rest):
            if r.endswith(".py"):
                after = rest[j + 1:]
                sub = after[0] if after and after[0] in SUB_COMMANDS.get(r, ()) else None
                return r, sub, after[1:] if sub else after
            if not r.startswith("-") and os.path.basename(w) != "torchrun":
                return None
            # torchrun's own options (--nproc_per_node 4) come before the script
    return None


def word_flags(words):
    """The --flags of a command's words: `[--frame-chunk N]` -> --frame-chunk, `--x=1` -> --x."""
    flags = []
    for w in words:
        w = w.strip("[]()|,")
        if re.fullmatch(r"--[A-Za-z0-9][\w-]*(=.*)?", w):
            flags.append(w.split("=")[0])
    return flags


def repo_path(word):
    """The repository path a word names (models/..., tests/x.py, README.md), or None for user paths."""
    w = word.strip("[](),;:'\"").split("::")[0]
    if not w or "<" in w or "{" in w or "://" in w:
        return None
    if w.startswith(REPO_PREFIXES):
        return w
    if "/" not in w and re.fullmatch(r"[\w.-]+\.(py|md)", w):
        return w
    return None


def ignored_patterns():
    """The .gitignore patterns: what matches them (models/build*/, out/) is output, not a repo file."""
    try:
        with open(os.path.join(ROOT, ".gitignore"), encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except FileNotFoundError:
        return []
    return [line.rstrip("/") for line in lines if line and not line.startswith(("#", "!"))]


def is_output(path):
    parts = path.rstrip("/").split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in ignored_patterns():
        if "/" in pattern.strip("/"):
            if any(fnmatch.fnmatch(p, pattern.lstrip("/")) for p in prefixes):
                return True
        elif any(fnmatch.fnmatch(part, pattern) for part in parts):
            return True
    return False


def path_exists(path):
    if "*" in path or "?" in path:
        return bool(glob.glob(os.path.join(ROOT, path)))
    return os.path.exists(os.path.join(ROOT, path.rstrip("/")))


@functools.lru_cache(maxsize=None)
def script_flags(script, sub):
    """The option strings `python script [sub] --help` prints (its usage and option lines), or why
    that command failed."""
    cmd = [sys.executable, script] + ([sub] if sub else []) + ["--help"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if res.returncode != 0:  # reported as a problem of every command of that script
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        return f"`{' '.join(cmd[1:])}` failed ({res.returncode}): {last}"
    lines = res.stdout.splitlines()
    usage = []
    for line in lines:
        if usage and not line.strip():
            break
        if usage or line.startswith("usage:"):
            usage.append(line)
    options = [line for line in lines if re.match(r"^ {1,6}-", line)]
    return frozenset(re.findall(r"(?<![\w-])--[A-Za-z0-9][\w-]*", "\n".join(usage + options)))


def check_command(words, where, flags_of):
    """Problems of one simple command: a repo path that is missing, a flag its script does not have."""
    problems = []
    for w in words:
        path = repo_path(w)
        if path and not is_output(path) and not path_exists(path):
            problems.append(f"{where}: `{path}` is not in the repository")
    call = script_call(words)
    if call is None:
        return problems
    script, sub, rest = call
    if script not in SCRIPTS:
        return problems  # a helper such as tests/measure_i3d_eps.py: its path is checked above
    sub = sub or DEFAULT_SUB.get(script)
    known = flags_of(script, sub)
    if isinstance(known, str):
        return problems + [f"{where}: {known}"]
    for flag in word_flags(rest):
        if flag not in known:
            name = f"{script} {sub}" if sub and script in SUB_COMMANDS else script
            problems.append(f"{where}: `{name}` has no {flag}")
    return problems


def check_markdown(text, name, flags_of=script_flags):
    """Every problem of a Markdown text: commands in code blocks and in backticks, and repo paths in
    backticks. `flags_of(script, sub)` gives a script's flags (the real --help by default)."""
    problems = []
    for n, line in code_lines(text):
        for words in simple_commands(line) or []:
            problems += check_command(words, f"{name}:{n}", flags_of)
    for n, span in backtick_spans(text):
        commands = simple_commands(span)
        if commands is None:  # not shell: still check the words that look like repo paths
            commands = [span.split()]
        for words in commands:
            problems += check_command(words, f"{name}:{n}", flags_of)
    return problems


def links(text):
    """The relative targets of the Markdown links [text](target) in a text (web addresses left out)."""
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in t]


def anchors(text):
    """The anchors of a Markdown text's headings, as GitHub makes them ("## What it took" -> what-it-took)."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def broken_links(name, text):
    """The links of page `name` (its contents: `text`) whose file, or #anchor in it, does not exist."""
    bad = []
    for target in links(text):
        path, _, anchor = target.partition("#")
        if path:  # another file, relative to this page
            path = os.path.normpath(os.path.join(os.path.dirname(name), path))
            exists = path_exists(path)
            target_text = read(path) if exists and path.endswith(".md") else ""
        else:  # a heading of this page
            exists, target_text = True, text
        if not exists or (anchor and anchor not in anchors(target_text)):
            bad.append(target)
    return bad


def read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="module")
def all_help():
    """Run every --help the pages need at once, in parallel: each one imports torch."""
    pairs = set()
    for name in doc_files():
        check_markdown(read(name), name, lambda script, sub: pairs.add((script, sub)) or frozenset())
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda pair: script_flags(*pair), sorted(pairs, key=str)))


@pytest.mark.parametrize("name", doc_files())
def test_commands_name_only_flags_and_files_that_exist(name, all_help):
    problems = check_markdown(read(name), name)
    assert not problems, "\n".join(problems)


def test_the_checker_catches_a_made_up_flag_and_a_made_up_file():
    fake = {("train.py", None): {"--steps", "--out"}, ("evaluate.py", "sr"): {"--seeds"},
            ("evaluate.py", "shapes"): {"--seeds"}}
    flags_of = lambda script, sub: fake[(script, sub)]  # noqa: E731
    good = ("Run it:\n\n    python train.py --steps 5 \\\n        --out out/x   # a comment --nope\n\n"
            "```\ntorchrun --nproc_per_node 2 train.py --steps 5 && python evaluate.py sr --seeds 2\n```\n"
            "then `python evaluate.py --seeds 1` and see `models/README.md`, `tests/test_docs.py`.\n")
    assert check_markdown(good, "good.md", flags_of) == []
    bad = {
        "    python train.py --steps 5 \\\n        --made-up-flag 1\n": "`train.py` has no --made-up-flag",
        "```bash\ntorchrun --nproc_per_node 2 train.py --made-up-flag\n```\n": "has no --made-up-flag",
        "see `python evaluate.py sr --seeds 2 --made-up-flag`\n": "`evaluate.py sr` has no --made-up-flag",
        "the file `models/made-up.safetensors`\n": "`models/made-up.safetensors` is not in the repository",
        "a span that wraps: `python train.py\n--made-up-flag` in prose\n": "`train.py` has no --made-up-flag",
        "```\npython made_up_script.py --x\n```\n": "`made_up_script.py` is not in the repository",
        "    python sample.py \"a dog\" --out out/dog.gif\n": "`sample.py` has no --out",
    }
    fake[("sample.py", None)] = set()
    for text, expected in bad.items():
        problems = check_markdown(text, "bad.md", flags_of)
        assert any(expected in p for p in problems), (text, problems)
    # user paths and Python blocks are not checked
    assert check_markdown("```python\nx = load('models/none.pt')\n```\n`out/x/adapters.safetensors`\n",
                          "user.md", flags_of) == []


def test_the_flags_come_from_the_scripts_help():
    flags = script_flags("evaluate.py", "sr")
    assert not isinstance(flags, str), flags
    assert {"--seeds", "--sr-ckpt", "--help"} <= flags and "--videos" not in flags
    assert "--videos" in script_flags("evaluate.py", "videos")


def test_readme_is_short_and_links_only_to_docs_pages_that_exist():
    size = os.path.getsize(os.path.join(ROOT, "README.md"))
    assert size <= README_LIMIT, f"README.md is {size} bytes (at most {README_LIMIT}): move detail to docs/"
    targets = links(read("README.md"))
    assert targets, "the README links to no docs page"
    outside = [t for t in targets if not re.fullmatch(r"docs/[\w-]+\.md(#.*)?", t)]
    assert not outside, f"README.md links to {outside}: only to docs/*.md pages"
    broken = broken_links("README.md", read("README.md"))
    assert not broken, f"README.md links to missing {broken}"


@pytest.mark.parametrize("name", doc_files()[1:])
def test_docs_pages_link_only_to_pages_and_headings_that_exist(name):
    broken = broken_links(name, read(name))
    assert not broken, f"{name} links to missing {broken}"


def test_the_link_check_catches_a_missing_page_and_heading():
    assert anchors("# Demo\n\n## What it took, measured\n") == {"demo", "what-it-took-measured"}
    text = ("[a](demo.md) [b](demo.md#what-it-took) [c](#here) [d](https://example.com/x.md)"
            " [e](no-such-page.md) [f](demo.md#no-such-heading) [g](#nowhere)\n\n## Here\n")
    assert broken_links("docs/made-up.md", text) == ["no-such-page.md", "demo.md#no-such-heading", "#nowhere"]
