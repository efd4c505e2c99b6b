"""Run by tests/test_interrupts.py: train.py's training as the command line runs it (train.main), on
one thread, ended at a deterministic point by SIGKILL of it and its input workers (or blocked there,
for a Ctrl-C).

Usage: kill_launcher.py MOMENT [train.py flags ...], where MOMENT is one of

    none                       no interruption
    before-rename:FILE:STEP    the save of STEP wrote FILE.tmp in full (flushed) but has not renamed it yet
    torn-tmp:FILE:STEP         the save of STEP wrote half of FILE.tmp
    torn-log:STEP              half of STEP's line is in log.jsonl
    logged:STEP                STEP's line is in log.jsonl, its save has not begun (STEP is a save step)
    step-start:STEP            the start of the step that makes STEP
    resumed-step:WHEN          the first step of a resumed run: WHEN is start, backward (the gradients
                               are computed, the optimizer has not stepped) or end (the optimizer stepped,
                               nothing is logged)
    torn-gif:STEP              half of the validation GIF of STEP is written (needs --val-prompt)
    block:STEP                 print "blocking in step STEP" and sleep inside that step (for SIGINT)

FILE is the base name of the file written (state.pt, adapters.safetensors, log.jsonl); STEP counts
optimizer steps done, so a resumed run's first step is its saved step + 1.
"""
import multiprocessing
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import checkpoint  # noqa: E402
import train  # noqa: E402

# Ctrl-C as a user's terminal delivers it, whatever this process inherited from the test run that started it (a
# SIGINT ignored or blocked there stays so across exec, and Python then installs no KeyboardInterrupt handler)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
signal.signal(signal.SIGINT, signal.default_int_handler)

moment, argv = sys.argv[1].split(":"), sys.argv[2:]
kind, where = moment[0], moment[1:]
done = [0]           # optimizer steps the run has done (a resumed run starts at its saved step)
resumed_at = [None]  # the saved step a resumed run started from; None for a fresh run
real = dict(train_step=train.train_step, resume=train.resume, save=train.save, start_log=train.start_log,
            save_video=train.save_video, write_atomic=checkpoint.write_atomic,
            clip_grad_norm_=torch.nn.utils.clip_grad_norm_)


def die():
    """SIGKILL the run: its input worker processes (--num-workers), then itself, as a kill of the job would."""
    sys.stdout.flush()
    sys.stderr.flush()
    for worker in multiprocessing.active_children():
        os.kill(worker.pid, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def at(step):
    return done[0] == int(step)


def in_first_resumed_step():
    return resumed_at[0] is not None and done[0] == resumed_at[0]


def resume(run, state):
    real["resume"](run, state)
    done[0] = resumed_at[0] = run.step


def train_step(run):
    done[0] = run.step  # while the step runs, `done` is the step before it
    first = in_first_resumed_step()
    if (kind == "step-start" and run.step + 1 == int(where[0])
            or kind == "resumed-step" and where[0] == "start" and first):
        die()
    if kind == "block" and run.step + 1 == int(where[0]):
        print(f"blocking in step {run.step + 1}", flush=True)
        # short sleeps: a SIGINT that lands on another thread (torch's) only sets a flag, which the main thread
        # reads between two sleeps, while one long sleep would hold it to the end
        for _ in range(6000):
            time.sleep(0.1)
    loss = real["train_step"](run)
    if kind == "resumed-step" and where[0] == "end" and first:
        die()
    done[0] = run.step
    return loss


def clip_grad_norm_(*args, **kwargs):  # train_step calls it between the backward and the optimizer step
    if kind == "resumed-step" and where[0] == "backward" and in_first_resumed_step():
        die()
    return real["clip_grad_norm_"](*args, **kwargs)


def write_atomic(path, write):
    if kind in ("before-rename", "torn-tmp") and os.path.basename(path) == where[0] and at(where[1]):
        tmp = f"{path}.tmp"
        write(tmp)
        if kind == "torn-tmp":
            os.truncate(tmp, os.path.getsize(tmp) // 2)
        fd = os.open(tmp, os.O_RDWR)
        os.fsync(fd)
        die()
    return real["write_atomic"](path, write)


class TornLog:
    """log.jsonl as start_log opens it, except that the process dies halfway through STEP's line."""

    def __init__(self, file):
        self.file = file

    def write(self, text):
        if kind == "torn-log" and at(where[0]):
            self.file.write(text[:len(text) // 2])
            self.file.flush()
            die()
        return self.file.write(text)

    def __getattr__(self, name):
        return getattr(self.file, name)


def start_log(path, step):
    return TornLog(real["start_log"](path, step))


def save(run):
    if kind == "logged" and at(where[0]):
        die()
    real["save"](run)


def save_video(video, path, *args, **kwargs):
    if kind == "torn-gif" and at(where[0]):
        real["save_video"](video, path, *args, **kwargs)
        os.truncate(path, os.path.getsize(path) // 2)
        die()
    return real["save_video"](video, path, *args, **kwargs)


train.train_step, train.resume, train.save, train.start_log, train.save_video = \
    train_step, resume, save, start_log, save_video
checkpoint.write_atomic = train.write_atomic = write_atomic  # the adapters' and state's saves, and the log's rewrite
torch.nn.utils.clip_grad_norm_ = clip_grad_norm_

torch.set_num_threads(1)
train.main(argv)
