"""A training run's life: one run at a time per --out (a lock), and a clean stop on Ctrl-C or SIGTERM.

    with stops.claim(cfg.out):                # a second run on the same --out is refused in one line
        with stops.StopOnSignal() as stop:    # Ctrl-C / SIGTERM: finish the step, save, exit
            with stop.abandonable():          # work that a signal may drop at once (a rollout)
                ...
            if stop.requested: save a checkpoint, then raise stop.exit(...)

The lock is an flock on <out>/.r2rank-lock, which the kernel lets go when the process ends, however
it ends. A run also outlives the reader of its output (ReaderlessStdout: `| head`, a `| less` quit).
What a run's --out holds and what --resume may change: runs.py.
"""
import contextlib
import os
import signal
import socket
import sys
import threading
import time


from machinery import distributed
from protocol import UsageError

from machinery import runs

from machinery import stops

try:  # POSIX; elsewhere --out is not locked
    import fcntl
except ImportError:
    fcntl = None


LOCK = ".r2rank-lock"  # in --out while a run holds it: "pid host"
_claimed = set()  # the outs this process holds (realpath)


class Claim:
    """Holds --out for one run (claim); release() (or the end of a with block) lets it go."""

    def __init__(self, out, fd=None, created=False):
        self.out, self.fd, self.created = out, fd, created

    def release(self):
        if self.fd is None:
            return
        with contextlib.suppress(OSError):  # gone, or --out became read-only: the lock still goes with the descriptor
            os.unlink(os.path.join(self.out, LOCK))  # before the lock is let go: see lock_file
        os.close(self.fd)
        self.fd = None
        _claimed.discard(os.path.realpath(self.out))
        if self.created:  # made for this run, which left nothing in it
            with contextlib.suppress(OSError):
                os.rmdir(self.out)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def claim(out):
    """Hold out (created if missing) for one run, until .release() or a with block's end: a run started
    on the same out meanwhile is refused in one line naming the pid that holds it. The lock is an flock
    on <out>/.r2rank-lock, and the kernel lets it go when the process ends, however it ends: the file a
    killed run leaves blocks nothing. Under torchrun every rank calls this; rank 0 holds the lock, and
    when it is refused every rank stops (rank 0 says why)."""
    if os.path.realpath(out) in _claimed or not distributed.is_main():  # held already by this process / rank 0's
        refusal, held = None, Claim(out)
    else:
        created = False
        try:
            runs.check_writable(out)
            created = not os.path.isdir(out)
            held, refusal = Claim(out, lock_file(out), created), None
        except UsageError as error:
            refusal = error
            if created:  # made for this run, which is refused: nothing of it stays
                with contextlib.suppress(OSError):
                    os.rmdir(out)
    if distributed.total(float(refusal is not None), "max"):
        raise refusal or UsageError(f"--out {out}: refused on rank 0")
    if held.fd is not None:
        _claimed.add(os.path.realpath(out))
    return held


def lock_file(out):
    """The descriptor of <out>/.r2rank-lock, flocked, holding "pid host"; a UsageError naming the holder when
    another process holds it. A holder removes the file before letting it go, so a lock taken on a file
    that is no longer at that path is let go and taken again on the new one."""
    if fcntl is None:
        return None
    path = os.path.join(out, LOCK)
    while True:
        try:
            os.makedirs(out, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:  # out removed meanwhile by a run that had made it
            continue
        except OSError as error:
            raise UsageError(f"--out {out}: cannot create it ({error.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = (os.read(fd, 200).decode(errors="replace").split() + ["?", ""])[:2]
            os.close(fd)
            where = "" if holder[1] in ("", socket.gethostname()) else f" on {holder[1]}"
            raise UsageError(f"{out} is in use by another run (pid {holder[0]}{where}); wait for it or choose another --out") from None
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    except OSError as error:  # a full disk, a quota: the file goes, as release() would remove it
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)
        raise UsageError(f"--out {out}: cannot write {LOCK} there ({error.strerror}); free space or choose another --out") from None
    return fd


class ReaderlessStdout:
    """sys.stdout for a run that must outlive the reader of its output: when that reader ends (`| head`,
    quitting `| less`), a print raised BrokenPipeError and the run died with a traceback, losing its steps
    since the last checkpoint. Then the output goes to /dev/null, with one note on stderr, and the run goes
    on (its rows are in metrics.jsonl, its results in its files)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self.reader_left()
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except BrokenPipeError:
            self.reader_left()

    def reader_left(self):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self.stream.fileno())  # the text left in the stream's buffer goes nowhere, at exit too
        os.close(devnull)
        print("note: the reader of this output has gone (a pipe into head or less?); the run goes on without printing "
              "(metrics.jsonl and its other files are written as before)", file=sys.stderr, flush=True)

    def __getattr__(self, name):  # fileno, isatty, encoding, ...: the stream's
        return getattr(self.stream, name)


class Abandoned(Exception):
    """Raised by StopOnSignal's handler inside an abandonable() block: the work in flight is dropped."""


class StopOnSignal:
    """Within the block, Ctrl-C (SIGINT) or SIGTERM stops the run at the next safe point:
    - inside an abandonable() block (work that changes nothing that is kept, such as a rollout), at once:
      the handler raises Abandoned and the loop keeps the steps before it;
    - elsewhere (an update in progress), the loop finishes the step, saves it, and stops.
    A second Ctrl-C stops at once (KeyboardInterrupt): only what is on disk is kept. .kept names it (the
    loop updates it after each save), so the messages say exactly what is kept."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    RELAYED_WITHIN = 2.0  # seconds: under torchrun, a SIGINT this soon after the first is torchrun's copy of it

    def __init__(self, kept="nothing (no checkpoint yet)"):
        self.requested, self.previous, self.kept, self.inside, self.requested_at = None, {}, kept, False, 0.0

    def handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested is not None and signum == signal.SIGINT:
            # A terminal's Ctrl-C reaches every process of the group, torchrun included, and torchrun then sends
            # each rank the signal it got: the same Ctrl-C twice, which must not read as a second one (it did
            # when torchrun's copy came after the first was handled: the step in progress and its save were lost).
            if distributed.world() > 1 and time.monotonic() - self.requested_at < self.RELAYED_WITHIN:
                return
            if distributed.is_main():  # rank 0 speaks for all
                print(f"\nSIGINT again: stopping now; kept: {self.kept}", file=sys.stderr, flush=True)
            raise KeyboardInterrupt
        if self.requested is not None:  # SIGTERM again (torchrun passes its own on): the stop is under way
            return
        self.requested, self.requested_at = signum, time.monotonic()
        if self.inside:
            self.inside = False
            raise Abandoned
        print(f"\n{name}: stopping after this step's update, with a checkpoint (Ctrl-C again to stop now, "
              f"keeping only {self.kept})", flush=True)

    @contextlib.contextmanager
    def abandonable(self, allowed=True):
        """A signal inside the block raises Abandoned (at once, not at the step's end); allowed=False
        makes the block ordinary (under torchrun the other ranks would wait for this one forever)."""
        if self.requested is not None and allowed:
            raise Abandoned
        self.inside = allowed
        try:
            yield
        finally:
            self.inside = False

    def __enter__(self):
        for signum in self.SIGNALS:
            self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        if self.requested is not None and distributed.world() > 1:
            # A torchrun rank stopping, with what is kept on disk: torchrun sends SIGTERM to the ranks still
            # running once one has exited; ignored, so this one ends with its own status rather than the
            # default's -15. Ignored, not handled: Python's shutdown, where such a SIGTERM lands, resets
            # the handlers Python set but leaves SIG_IGN. (torchrun's SIGKILL, 30 s on, ends a rank that hangs.)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def exit(self, kept, say=True):
        """The SystemExit to raise once what is kept is on disk: one line (unless say is False: under
        torchrun rank 0 speaks for all), status 128 + the signal's number."""
        if say:
            print(f"stopped by {signal.Signals(self.requested).name}: {kept}", file=sys.stderr)
        return SystemExit(128 + self.requested)


def interrupted_message(out):
    """What a run that stopped at once (a second Ctrl-C, a crash) left for --resume, in one line."""
    checkpoint = runs.latest_checkpoint(out)
    if checkpoint is None:
        return f"no checkpoint in {out}: nothing of the run is kept"
    return (f"kept {checkpoint}; --resume continues from it and runs the later steps again "
            "(their metrics.jsonl rows are dropped then)")


class Terminated(BaseException):
    """Raised by the SIGTERM handler of stop_on_sigterm (a BaseException: no `except Exception` swallows it)."""


@contextlib.contextmanager
def stop_on_sigterm(message):
    """For a stage without a step to finish (eval, sft-data): within the block SIGTERM stops it as Ctrl-C
    does, at once, printing `message` (rank 0) and exiting 143 (128 + 15). Without it SIGTERM killed the
    process without a word."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        yield
        return

    def handle(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    except Terminated:
        if distributed.is_main():
            print(message, file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
