"""train.py, interrupted for real: training subprocesses (tests/kill_launcher.py) SIGKILL themselves
at deterministic moments (inside a checkpoint write before its rename, halfway through a temporary
file, halfway through a log line, between a logged step and its save, inside the first step after a
resume, inside a resume's log rewrite, before the first save, halfway through a validation GIF) or
get a Ctrl-C (SIGINT). Proved:

- after any such kill, running again with --resume to the same --steps (which starts the run over
  when nothing was saved yet) ends with adapters bitwise equal to an uninterrupted run's and a log.jsonl of
  exactly one line per step, 1..N in order, with the same losses; the *.tmp files a killed write
  left are removed, and said so; no torn validation GIF is left behind;
- a torn last log line is dropped with a warning;
- a Ctrl-C exits with code 130 and no traceback, naming the last saved step and a --resume command
  that continues the run to the same result;
- a corrupt state.pt fails with --resume (exit code 2, one error line naming it) and leaves every
  file of the output folder as it was.
"""
import concurrent.futures
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from PIL import Image

import simda
from conftest import ROOT

STEPS = 6  # saved at steps 2, 4 and 6
TRAIN = ["--data", "shapes", "--size", "16", "--frames", "4", "--batch-size", "2", "--lr", "1e-3",
         "--steps", str(STEPS), "--save-every", "2", "--log-every", "1"]
TIMEOUT = 120


@dataclass
class Stage:
    """One training subprocess and the output folder as it left it."""
    moment: str
    returncode: int
    stdout: str
    stderr: str
    files: list           # the folder's file names
    log: str              # log.jsonl's text
    saved: int            # state.pt's step; None if there is no state.pt
    adapters: int         # adapters.safetensors' step; None if there is none


def train_argv(ckpt, out, resume, extra=()):
    return ["--ckpt", ckpt, "--out", out, *TRAIN, *extra] + (["--resume"] if resume else [])


def launch(moment, argv):
    """kill_launcher.py MOMENT argv, to its end or its kill."""
    return subprocess.run([sys.executable, os.path.join("tests", "kill_launcher.py"), moment, *argv],
                          cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)


def look(out, moment, result):
    files = sorted(os.listdir(out)) if os.path.isdir(out) else []
    log = ""
    if "log.jsonl" in files:
        with open(os.path.join(out, "log.jsonl")) as f:
            log = f.read()
    saved = torch.load(os.path.join(out, "state.pt"), weights_only=True)["step"] if "state.pt" in files else None
    adapters = simda.read_adapters(os.path.join(out, "adapters.safetensors"))[1]["step"] \
        if "adapters.safetensors" in files else None
    return Stage(moment, result.returncode, result.stdout, result.stderr, files, log, saved, adapters)


def run_chain(ckpt, out, stages, extra=()):
    """Run the stages [(moment, resume, more flags...)] one after another in `out`, each with the flags
    `extra` and its own; the last runs to the end."""
    return [look(out, moment, launch(moment, train_argv(ckpt, out, resume, [*extra, *more])))
            for moment, resume, *more in stages]


BASE = ("step-start:6", False)  # killed at the start of step 6: state.pt at step 4, log lines 1..5
# Each scenario: its killed runs, in order, as (kill moment, with --resume); then a run to the end,
# with --resume. Scenarios starting with BASE start from one copy of it.
SCENARIOS = {
    "uninterrupted": [],
    "before-rename:state.pt": [("before-rename:state.pt:4", False)],
    "before-rename:adapters.safetensors": [("before-rename:adapters.safetensors:4", False)],
    "torn-tmp:state.pt": [("torn-tmp:state.pt:4", False)],
    "torn-tmp:adapters.safetensors": [("torn-tmp:adapters.safetensors:4", False)],
    "logged": [("logged:4", False)],
    "torn-log": [("torn-log:5", False)],
    "first save": [("before-rename:state.pt:2", False)],
    "torn-gif": [("torn-gif:4", False)],
    "resumed-step:start": [BASE, ("resumed-step:start", True)],
    "resumed-step:backward": [BASE, ("resumed-step:backward", True)],
    "resumed-step:end": [BASE, ("resumed-step:end", True)],
    "log rewrite": [BASE, ("before-rename:log.jsonl:4", True)],
    # input read by worker processes, killed with them; resumed with another number of workers
    "workers": [],
    "workers:logged": [("logged:4", False, "--num-workers", "2")],
    "workers:resumed-step": [("torn-tmp:state.pt:4", False, "--num-workers", "2"),
                             ("resumed-step:backward", True, "--num-workers", "2")],
}
VALIDATION = ["--val-prompt", "a red circle moving right", "--val-steps", "2", "--sample-every", "2"]
EXTRA = {"torn-gif": VALIDATION,  # more train.py flags, for every run of the scenario (a stage's own come after)
         "workers": ["--num-workers", "2"], "workers:logged": ["--num-workers", "1"],
         "workers:resumed-step": ["--num-workers", "0"]}


def interrupt_and_resume(ckpt, out):
    """Ctrl-C a run blocked in step 6, then run the command its message gives: (argv, [Stage, Stage])."""
    argv = train_argv(ckpt, out, resume=False)
    process = subprocess.Popen([sys.executable, os.path.join("tests", "kill_launcher.py"), "block:6", *argv],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        head = ""
        for line in process.stdout:  # when it blocks, step 5 is logged and step 4 saved
            head += line
            if line.startswith("blocking in step 6"):
                process.send_signal(signal.SIGINT)
                break
        stdout, stderr = process.communicate(timeout=TIMEOUT)
    finally:
        process.kill()
        process.wait()
    stages = [look(out, "block:6", subprocess.CompletedProcess(argv, process.returncode, head + stdout, stderr))]
    if "continue with: " in stderr:
        command = shlex.split(stderr.rsplit("continue with: ", 1)[1])
        stages.append(look(out, "none", launch("none", command[2:])))
    return argv, stages


@pytest.fixture(scope="module")
def runs(tiny_checkpoint, module_tmp_path):
    """{scenario: (output folder, [Stage of each run])}, plus "ctrl-c": (argv, [Stage, Stage]); the
    runs go side by side, one single-threaded process per core (at most 4)."""
    root = module_tmp_path
    ckpt, base = tiny_checkpoint, str(root / "base")

    def scenario(name, killed):
        out = str(root / name.replace(":", "-").replace(" ", "-"))
        resume = bool(killed)
        if killed[:1] != [BASE]:
            return out, run_chain(ckpt, out, [*killed, ("none", resume)], EXTRA.get(name, ()))
        shutil.copytree(base, out)
        return out, [base_stage, *run_chain(ckpt, out, [*killed[1:], ("none", resume)])]

    with concurrent.futures.ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
        base_future = pool.submit(run_chain, ckpt, base, [BASE])
        futures = {name: pool.submit(scenario, name, killed) for name, killed in SCENARIOS.items()
                   if killed[:1] != [BASE]}
        futures["ctrl-c"] = pool.submit(interrupt_and_resume, ckpt, str(root / "ctrl-c"))
        [base_stage] = base_future.result()
        futures.update({name: pool.submit(scenario, name, killed) for name, killed in SCENARIOS.items()
                        if killed[:1] == [BASE]})
        return {name: future.result() for name, future in futures.items()}


@pytest.fixture(scope="module")
def uninterrupted(runs):
    out, [stage] = runs["uninterrupted"]
    assert stage.returncode == 0, stage.stderr[-3000:]
    return out


def log_entries(text):
    return [json.loads(line) for line in text.splitlines(keepends=True)]


def assert_same_as_uninterrupted(out, reference):
    """Bitwise equal adapters, one log line per step 1..STEPS with the uninterrupted run's losses, no *.tmp."""
    ours = simda.read_adapters(os.path.join(out, "adapters.safetensors"))[0]
    theirs = simda.read_adapters(os.path.join(reference, "adapters.safetensors"))[0]
    assert ours.keys() == theirs.keys() and theirs
    different = [k for k in theirs if not torch.equal(ours[k], theirs[k])]
    assert not different, f"{len(different)} adapter tensors differ, e.g. {different[:3]}"
    with open(os.path.join(out, "log.jsonl")) as f, open(os.path.join(reference, "log.jsonl")) as g:
        text, reference_text = f.read(), g.read()
    assert text.endswith("\n") and all(line.strip() for line in text.splitlines())
    entries, reference_entries = log_entries(text), log_entries(reference_text)
    assert [e["step"] for e in entries] == list(range(1, STEPS + 1))
    assert [e["loss"] for e in entries] == [e["loss"] for e in reference_entries]
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def assert_finished(stage):
    assert stage.returncode == 0, stage.stderr[-3000:]
    assert "Traceback" not in stage.stderr and "done: adapters in" in stage.stdout
    assert stage.saved == STEPS


def assert_killed(stage):
    assert stage.returncode == -signal.SIGKILL, (stage.moment, stage.returncode, stage.stderr[-3000:])


def removed(out, name):
    return f"removed {os.path.join(out, name)}, left by an interrupted write"


def test_the_uninterrupted_run_logs_every_step_and_saves_its_last(runs, uninterrupted):
    [stage] = runs["uninterrupted"][1]
    assert_finished(stage)
    assert [e["step"] for e in log_entries(stage.log)] == list(range(1, STEPS + 1))
    assert stage.files == ["adapters.safetensors", "log.jsonl", "state.pt"]


@pytest.mark.parametrize("name", ["state.pt", "adapters.safetensors"])
def test_a_kill_inside_a_checkpoint_write_before_its_rename_resumes_to_the_uninterrupted_result(name, runs,
                                                                                               uninterrupted):
    out, (killed, resumed) = runs[f"before-rename:{name}"]
    assert_killed(killed)
    assert f"{name}.tmp" in killed.files
    # adapters.safetensors is written first: a kill in state.pt's write leaves the adapters of step 4
    assert killed.saved == 2 and killed.adapters == (4 if name == "state.pt" else 2)
    assert_finished(resumed)
    assert removed(out, f"{name}.tmp") in resumed.stderr
    assert_same_as_uninterrupted(out, uninterrupted)


@pytest.mark.parametrize("name", ["state.pt", "adapters.safetensors"])
def test_a_kill_halfway_through_writing_a_temporary_file_resumes_to_the_uninterrupted_result(name, runs,
                                                                                            uninterrupted):
    out, (killed, resumed) = runs[f"torn-tmp:{name}"]
    assert_killed(killed)
    assert f"{name}.tmp" in killed.files and killed.saved == 2
    assert_finished(resumed)
    assert removed(out, f"{name}.tmp") in resumed.stderr
    assert_same_as_uninterrupted(out, uninterrupted)


@pytest.mark.parametrize("when", ["start", "backward", "end"])
def test_a_kill_inside_the_first_step_after_a_resume_resumes_to_the_uninterrupted_result(when, runs, uninterrupted):
    out, (first, killed, resumed) = runs[f"resumed-step:{when}"]
    assert_killed(first)
    assert first.saved == 4 and [e["step"] for e in log_entries(first.log)] == [1, 2, 3, 4, 5]
    assert_killed(killed)
    # the resumed run cut the log back to its saved step, and died before logging its first step
    assert killed.saved == 4 and [e["step"] for e in log_entries(killed.log)] == [1, 2, 3, 4]
    assert_finished(resumed)
    assert_same_as_uninterrupted(out, uninterrupted)


def test_a_kill_inside_the_log_rewrite_of_a_resume_resumes_to_the_uninterrupted_result(runs, uninterrupted):
    out, (first, killed, resumed) = runs["log rewrite"]
    assert_killed(first)
    assert_killed(killed)
    assert "log.jsonl.tmp" in killed.files
    assert [e["step"] for e in log_entries(killed.log)] == [1, 2, 3, 4, 5]  # the old log, whole
    assert_finished(resumed)
    assert removed(out, "log.jsonl.tmp") in resumed.stderr
    assert_same_as_uninterrupted(out, uninterrupted)


def test_a_kill_between_a_logged_step_and_its_save_resumes_to_the_uninterrupted_result(runs, uninterrupted):
    out, (killed, resumed) = runs["logged"]
    assert_killed(killed)
    assert killed.saved == 2 and [e["step"] for e in log_entries(killed.log)] == [1, 2, 3, 4]
    assert not [n for n in killed.files if n.endswith(".tmp")]
    assert_finished(resumed)
    assert_same_as_uninterrupted(out, uninterrupted)


def test_a_torn_last_log_line_is_dropped_with_a_warning_on_resume(runs, uninterrupted):
    out, (killed, resumed) = runs["torn-log"]
    assert_killed(killed)
    complete, torn = killed.log.rsplit("\n", 1)
    assert [e["step"] for e in log_entries(complete)] == [1, 2, 3, 4]
    assert torn.startswith('{"step": 5') and not torn.endswith("}")
    assert_finished(resumed)
    log = os.path.join(out, "log.jsonl")
    assert f"warning: {log}: dropped line 5, which is not complete JSON (torn by a kill?)" in resumed.stderr
    assert_same_as_uninterrupted(out, uninterrupted)


def test_a_kill_before_the_first_save_is_done_resumes_by_starting_over(runs, uninterrupted):
    out, (killed, rerun) = runs["first save"]
    assert_killed(killed)
    assert killed.saved is None and killed.adapters == 2 and "state.pt.tmp" in killed.files
    assert_finished(rerun)
    assert "stopped before its first save; starting it over" in rerun.stderr
    assert removed(out, "state.pt.tmp") in rerun.stderr
    assert_same_as_uninterrupted(out, uninterrupted)


def test_a_kill_while_writing_a_validation_gif_resumes_to_whole_gifs(runs, uninterrupted):
    out, (killed, resumed) = runs["torn-gif"]
    assert_killed(killed)
    assert killed.saved == 2  # the GIFs of a step are written before its save
    assert_finished(resumed)
    for step in (2, 4, 6):
        path = os.path.join(out, "samples", f"step{step:06d}.gif")
        with open(path, "rb") as f:
            torn = not f.read().endswith(b"\x3b")  # the GIF trailer
        assert not torn, f"{path} is torn"
        with Image.open(path) as gif:
            assert gif.n_frames == 4 and gif.size == (16, 16)
    assert_same_as_uninterrupted(out, uninterrupted)


def test_ctrl_c_exits_130_naming_the_last_saved_step_and_a_resume_command_that_finishes_the_run(runs,
                                                                                             uninterrupted):
    argv, (interrupted, *resumed) = runs["ctrl-c"]
    assert "blocking in step 6" in interrupted.stdout  # the SIGINT came inside step 6: step 5 logged, 4 saved
    assert interrupted.returncode == 130, interrupted.stderr[-3000:]
    assert "Traceback" not in interrupted.stderr + interrupted.stdout
    out, command = argv[argv.index("--out") + 1], "python train.py " + " ".join(shlex.quote(a) for a in argv) + " --resume"
    state = os.path.join(out, "state.pt")
    assert interrupted.stderr.endswith(f"interrupted: the last saved step is 4 ({state}); continue with: {command}\n"), \
        interrupted.stderr[-3000:]
    assert interrupted.saved == 4 and not [n for n in interrupted.files if n.endswith(".tmp")]
    [resumed] = resumed  # the command of the message, run by kill_launcher.py
    assert_finished(resumed)
    assert_same_as_uninterrupted(out, uninterrupted)


@pytest.mark.parametrize("name", ["workers", "workers:logged", "workers:resumed-step"])
def test_runs_whose_input_workers_are_killed_with_them_resume_to_the_uninterrupted_result(name, runs, uninterrupted):
    """Worker processes read steps ahead; whatever they had read when the run was killed, the resumed
    run (with another number of workers) ends as the uninterrupted run without workers does."""
    out, stages = runs[name]
    for stage in stages[:-1]:
        assert_killed(stage)
    assert_finished(stages[-1])
    assert "input: 2 worker process(es)" in stages[0].stdout
    assert_same_as_uninterrupted(out, uninterrupted)


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.99])
def test_a_corrupt_state_pt_fails_with_resume_and_touches_nothing(keep, uninterrupted, tiny_checkpoint, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(uninterrupted, out)
    state = os.path.join(out, "state.pt")
    os.truncate(state, int(os.path.getsize(state) * keep))

    def contents():
        return {name: open(os.path.join(out, name), "rb").read() for name in sorted(os.listdir(out))}
    before = contents()
    result = launch("none", train_argv(tiny_checkpoint, out, resume=True) + ["--steps", str(STEPS + 2)])
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert f"error: {state} is not a readable torch file" in line
    after = contents()
    assert after.keys() == before.keys() == {"adapters.safetensors", "log.jsonl", "state.pt"}
    assert all(after[name] == before[name] for name in before)
