"""Shared by the test files: the project's scripts run as processes, and a small synthetic data set.

A script run (run_script, run_cli) is a real process with its own exit status, standard output and
error, current directory and argv, but it is forked from one server process that has already imported
torch, transformers and the project (multiprocessing's forkserver), instead of starting a new Python
that imports them again: each run starts in well under a second rather than in three to five. The
server is a fresh interpreter, not this pytest process, so nothing a test did here leaks into a run.
Tests about the process itself (signals, torchrun) still start their own with subprocess.
"""
import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
import tempfile

import pytest
import torch

import datasets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_context = None


def _forkserver():
    """multiprocessing's fork server, started once with the imports of cli_warmup.py done."""
    global _context
    if _context is None:
        import multiprocessing.forkserver

        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(["conftest", "cli_warmup"])
        # The server is a new interpreter: before Python 3.12 it ignores this process's sys.path, so the
        # modules to preload are found through PYTHONPATH, set only while it starts.
        saved = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests")] + ([saved] if saved else []))
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            if saved is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = saved
    return _context


def _run_in_child(script, args, cwd, environ, stdout_path, stderr_path, fresh=False):
    """In the forked process: `python script args` from cwd with this environment, output into the two files.
    fresh: the project's modules are imported again, found as a plain `python script` finds them (torch and
    transformers stay loaded)."""
    if fresh:
        def project(path):  # the repository's own files, not those of a venv inside it (README's .venv)
            path = os.path.realpath(path) + os.sep
            return path.startswith(os.path.realpath(ROOT) + os.sep) and f"{os.sep}site-packages{os.sep}" not in path
        sys.path[:] = [path for path in sys.path if path and not project(path)]  # '' too: a script run has none
        for name in [name for name, module in sys.modules.items() if getattr(module, "__file__", None) and project(module.__file__)]:
            del sys.modules[name]
    os.environ.clear()
    os.environ.update(environ)  # the caller's, as a subprocess would inherit it (not the server's)
    for fd, path in ((1, stdout_path), (2, stderr_path)):
        file_fd = os.open(path, os.O_WRONLY)
        os.dup2(file_fd, fd)
        os.close(file_fd)
    if cwd is not None:
        os.chdir(cwd)
    sys.argv = [script, *args]
    sys.path[0:0] = [os.path.dirname(os.path.abspath(script))]  # as `python script` puts the script's folder first
    runpy.run_path(script, run_name="__main__")  # SystemExit sets the exit status, as in a plain run


def terminal_sigint():
    """preexec_fn of a child that must take Ctrl-C as a process started from a terminal does: SIGINT at its
    default. A child inherits an ignored SIGINT (pytest started in the background by a shell, or under
    nohup), and Python then installs no KeyboardInterrupt handler, so the Ctrl-C would do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_script(script, *args, cwd=None, timeout=600, fresh=False):
    """`python script ARGS` (cwd: the current directory when None) as a forked process; returns a
    subprocess.CompletedProcess with text stdout and stderr, like subprocess.run(..., capture_output=True).
    fresh: the project's own modules imported anew from the script's sys.path (_run_in_child)."""
    args = [str(a) for a in args]
    with tempfile.NamedTemporaryFile() as out, tempfile.NamedTemporaryFile() as err:
        process = _forkserver().Process(target=_run_in_child, args=(script, args, cwd, dict(os.environ), out.name, err.name, fresh))
        process.start()
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired([script, *args], timeout)
        with open(out.name) as stdout, open(err.name) as stderr:
            return subprocess.CompletedProcess([sys.executable, script, *args], process.exitcode, stdout.read(), stderr.read())


def run_cli(*args):
    """python r2rank.py ARGS from the repository root; returns the CompletedProcess (text output)."""
    return run_script(os.path.join(ROOT, "r2rank.py"), *args, cwd=ROOT)


@pytest.fixture(autouse=True, scope="session")
def stop_the_fork_server():
    """At the end, stop the fork server and wait for it, so that the CPU time of the runs it forked
    counts in this process's (what `time python -m pytest` reports)."""
    yield
    if _context is not None:
        import multiprocessing.forkserver

        multiprocessing.forkserver._forkserver._stop()


@pytest.fixture(autouse=True)
def run_state_restored():
    """An in-process run (r2rank.main) installs its Ctrl-C / SIGTERM handlers, may record a stop, and holds
    its --out's lock for the life of the process: all three are undone after each test."""
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in handlers.items():
        signal.signal(signum, handler)
    runs = sys.modules.get("runs")
    if runs is not None and hasattr(runs, "STOP"):
        runs.STOP.update(signal=None, at=0.0)
    held = getattr(runs.claim, "held", None) if runs is not None else None
    if held is not None and os.path.realpath(f"/proc/self/fd/{held}").endswith(runs.LOCK):  # still the lock's
        os.close(runs.claim.__dict__.pop("held"))


@pytest.fixture(autouse=True)
def one_thread(request):
    """One torch thread, except in the real-model checks (`slow`): the tiny model's operations are too
    small for intra-op threads to pay off, and on a busy machine their synchronization made tests up
    to ten times slower."""
    threads = torch.get_num_threads()
    if request.node.get_closest_marker("slow") is None:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def float64_copy(model):
    """A copy of model in fp64, RMSNorm included (transformers' RMSNorm computes in fp32 whatever its input):
    two exact computations of one function then agree to ~1e-14, so a tight tolerance tells a real
    difference from rounding."""
    import copy
    import types

    model = copy.deepcopy(model).double()

    def rms_norm(self, hidden):
        return self.weight * hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(rms_norm, module)
    return model


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    """The built-in synthetic set with 40 users (32 / 4 / 4), built once per test module."""
    path = tmp_path_factory.mktemp("synthetic") / "data"
    datasets.build_synthetic(str(path), users=40, seed=0)
    return str(path)


def read_only(folder, monkeypatch):
    """Make folder read-only as `chmod 555` does: nothing can be created, removed or renamed in it (its files
    stay writable). Returns "chmod" where the chmod binds; as root it does not (root writes anyway), and then
    the os calls that create, remove or rename an entry of folder raise PermissionError in this process, as
    they would for another user (calls relative to a dir_fd, as shutil.rmtree makes, pass). The caller's
    monkeypatch undoes the patches; chmod the folder back before its tmp_path is cleaned up."""
    import builtins
    import errno

    os.chmod(folder, 0o555)
    if not os.access(folder, os.W_OK):
        return "chmod"
    top = os.path.realpath(folder)

    def inside(path, dir_fd=None):
        return dir_fd is None and not isinstance(path, int) and os.path.dirname(os.path.realpath(os.fspath(path))) == top

    def refused(path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))

    def guard(function, creates=False):
        def guarded(path, *args, dir_fd=None, **kwargs):
            if inside(path, dir_fd) and not (creates and os.path.exists(path)):
                refused(path)
            return function(path, *args, **({"dir_fd": dir_fd} if dir_fd is not None else {}), **kwargs)
        return guarded

    def guard_move(function):
        def guarded(source, target, *args, **kwargs):
            for path in (source, target):
                if inside(path):
                    refused(path)
            return function(source, target, *args, **kwargs)
        return guarded

    opened = builtins.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax") and inside(file) and not os.path.exists(file):
            refused(file)
        return opened(file, mode, *args, **kwargs)

    raw_open = os.open

    def guarded_raw_open(path, flags, *args, dir_fd=None, **kwargs):
        if flags & os.O_CREAT and inside(path, dir_fd) and not os.path.exists(path):
            refused(path)
        return raw_open(path, flags, *args, **({"dir_fd": dir_fd} if dir_fd is not None else {}), **kwargs)

    for name in ("mkdir", "unlink", "remove", "rmdir"):
        monkeypatch.setattr(os, name, guard(getattr(os, name), creates=name == "mkdir"))
    for name in ("rename", "replace"):
        monkeypatch.setattr(os, name, guard_move(getattr(os, name)))
    monkeypatch.setattr(os, "open", guarded_raw_open)
    monkeypatch.setattr(builtins, "open", guarded_open)
    return "simulated"


_failed = []


def pytest_runtest_logreport(report):
    if report.failed:
        _failed.append(report.nodeid)


def pytest_unconfigure(config):
    """The failed tests' names once more, after pytest's summary line: a CI log cut to its last line still names them."""
    if _failed:
        print(f"{len(_failed)} failed: {' '.join(dict.fromkeys(_failed))}", file=sys.__stdout__, flush=True)
