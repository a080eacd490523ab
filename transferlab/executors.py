"""Running a study's steps on Ray: one task per step, started by Ray as soon as its inputs are finished.

The planner (study.plan) and the step function (study.execute_step) are the local executor's; this
module only ships steps to Ray workers and reports back. A step reads its inputs' outputs from, and
writes its own output to, the study's folder, so every node must see that folder (a shared file
system); the executor checks this on every node before it starts. Steps are pure functions of their
config and inputs, and every random draw is seeded from the step, so the tables do not depend on which
node ran what, or in which order. A worker that dies mid-step is retried by Ray (``max_retries``); a
retried training step first removes the staging folder of the dead attempt (study.execute_step).

Ray is an optional dependency (``pip install 'transferlab[ray]'``), imported only when this executor runs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path

from transferlab.config import StepResources
from transferlab.errors import UserError
from transferlab.model_sources import TRUST_ENV
from transferlab.resources import STEP_KIND_RESOURCES, describe, fits, given, merged, parse_resources, ray_options
from transferlab.study.execute import LocalExecutor, StudyContext, execute_step
from transferlab.study.plan import Step

EXECUTORS = ("local", "ray")
# Each node's first task starts a Ray worker that imports transferlab (torch): 3-5 s on 2 quiet cores, and more than
# 60 s when a 2-core machine runs a study and two test workers' Ray clusters at once (three CI test failures).
PROBE_TIMEOUT_S = 180
CONNECT_TIMEOUT_S = 20  # --address must answer within this: Ray itself retries a dead address for minutes
SESSIONS_FILE = "ray-sessions.json"  # local clusters this machine's drivers started (cache directory)


def import_ray():
    try:
        import ray  # optional: only `--executor ray` needs it
    except ImportError:
        raise UserError("--executor ray needs Ray, which is not installed; pip install 'transferlab[ray]'") from None
    return ray


def _run_step(step: Step, ctx: StudyContext, cwd: str, *inputs_done) -> dict:
    """One step on a Ray worker: the same execute_step the local executor calls."""
    import ray

    os.chdir(cwd)  # step outputs are paths relative to the driver's working directory (on the shared file system)
    # The step's own thread count (decided by the plan, in its key; execute_step pins it): the thread count
    # changes float reduction order, so it is never the CPUs the task holds nor what else the node runs.
    threads = step.threads
    os.environ["OMP_NUM_THREADS"] = str(threads)
    context = ray.get_runtime_context()
    ctx.worker = {"executor": "ray", "host": socket.gethostname(), "node_id": context.get_node_id(),
                  "node_ip": ray.util.get_node_ip_address(), "threads": threads}
    started = time.perf_counter()
    summary = execute_step(step, ctx)
    return {"summary": summary, "seconds": time.perf_counter() - started, "node": ctx.worker["node_ip"],
            "node_id": ctx.worker["node_id"]}


def _sees(path: str, token: str, cwd: str) -> tuple[str, bool]:
    try:
        seen = Path(path).read_text() == token and Path(cwd).is_dir()
    except OSError:
        seen = False
    import ray

    return ray.util.get_node_ip_address(), seen


class RayExecutor:
    """Runs a study's steps as Ray tasks on a local Ray (``jobs`` CPU slots, every GPU) or on the cluster
    at ``address``. ``settings``: the command line's typed resources (config.StepResources, for every step);
    ``resources``: per step kind, from the deprecated --step-resources string (transferlab.resources); the
    study's [executor] table and the defaults fill in what they leave out."""

    def __init__(self, address: str | None = None, jobs: int | None = None, resources: dict | None = None,
                 max_retries: int | None = None, settings: StepResources | None = None):
        if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
            raise UserError(f"--jobs must be a whole number of at least 1, got {jobs!r}")
        if jobs is not None and address:
            raise UserError("--jobs sizes a local Ray; with --address the cluster's own CPUs and GPUs count "
                            "(set them with 'ray start --num-cpus N --num-gpus M')")
        if max_retries is not None and max_retries < 0:
            raise UserError(f"max_retries must be 0 or more, got {max_retries}")
        self.address, self.jobs, self.command_line, self.max_retries = address, jobs, resources or {}, max_retries
        self.settings = settings if settings is not None else StepResources()

    # ------------------------------------------------------------ cluster
    def _connect(self, ray) -> tuple[bool, bool]:
        """Start a local Ray or join the cluster. Returns (connected here: this run disconnects at its end,
        started here: a local Ray this run owns, whose leftover processes it kills). A cluster joined with
        --address belongs to someone else: it is only disconnected from, never stopped."""
        if ray.is_initialized():
            return False, False
        options = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        trusted = os.environ.get(TRUST_ENV)
        if trusted:  # workers on other nodes load runs too: the driver's --trust-code travels with them
            options["runtime_env"] = {"env_vars": {TRUST_ENV: trusted}}
        try:
            if self.address:
                _check_reachable(self.address)
                ray.init(address=self.address, **options)
            else:  # a local Ray listens on the loopback interface only
                reap_orphaned_sessions()
                # address="local": a Ray of our own, even where `ray start` left a cluster running on this machine;
                # ray.init() would join that one (RAY_ADDRESS or the latest `ray start`), and this run would then
                # reap it at the end, or die with it when its owner stops it.
                ray.init(address="local", num_cpus=self.jobs, _node_ip_address="127.0.0.1", **options)
                _remember_session(ray)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"the Ray cluster at {self.address}" if self.address else "a local Ray"
            hint = ("start one with 'ray start --head' or drop --address; if it runs, use its RAY_AUTH_MODE here "
                    "too (Ray 2.60 heads default to token auth: RAY_AUTH_MODE=token and its ~/.ray/auth_token)"
                    if self.address else "see 'ray status'")
            raise UserError(f"could not start or reach {where} ({str(exc).splitlines()[0][:200]}); {hint}") from None
        return True, not self.address

    def _check_nodes(self, ray, out_dir: Path, cwd: str) -> None:
        """Every live node must see --out: a probe file written here is read back by a task pinned to each node."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        token = uuid.uuid4().hex
        probe = out_dir.resolve() / f".transferlab-probe-{token[:8]}"
        probe.write_text(token)
        try:
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            sees = ray.remote(num_cpus=0)(_sees)
            refs = [sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                    .remote(str(probe), token, cwd) for n in nodes]
            try:
                answers = ray.get(refs, timeout=PROBE_TIMEOUT_S)
            except ray.exceptions.GetTimeoutError:
                raise UserError(f"a Ray node did not answer the check that it sees {out_dir} within "
                                f"{PROBE_TIMEOUT_S} s; is every node up ('ray status')?") from None
        finally:
            probe.unlink(missing_ok=True)
        blind = sorted(ip for ip, seen in answers if not seen)
        if blind:
            raise UserError(f"Ray node(s) {', '.join(blind)} cannot see the output folder {out_dir.resolve()} "
                            f"(or the working directory {cwd}); --out must be on a file system every node mounts "
                            f"at the same path")

    def _resources(self, ray, study: dict, steps: list[Step], device: str = "auto") -> dict:
        """Each step kind's request (transferlab.resources.merged), checked to fit on some live node."""
        resources = merged(ray.cluster_resources().get("GPU", 0), study.get("executor", {}), self.settings,
                           self.command_line, device)
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        for kind in sorted({STEP_KIND_RESOURCES[s.kind] for s in steps}):
            need = resources[kind]
            if not any(fits(need, node) for node in nodes):
                have = "; ".join(f"cpu={n.get('CPU', 0):g},gpu={n.get('GPU', 0):g},"
                                 f"memory={n.get('memory', 0) / 2**30:.1f} GiB" for n in nodes)
                raise UserError(f"{kind} steps ask for {describe(need)}, more than any Ray node has ({have}); "
                                f"lower it with --num-cpus / --num-gpus / --memory or the study's [executor] "
                                f"{kind} table")
        return resources

    @staticmethod
    def task_options(step: Step, resources: dict, most_cpus: float, retries: int) -> dict:
        """The ``.options(...)`` of ``step``'s Ray task: its kind's resources (transferlab.resources.ray_options:
        a CPU per thread it runs unless num_cpus says otherwise, so that steps side by side do not fight over
        cores), its retries and its name."""
        return {**ray_options(resources[STEP_KIND_RESOURCES[step.kind]], step.threads, most_cpus),
                "max_retries": retries, "name": step.id}

    # ------------------------------------------------------------ run
    def run(self, steps: list[Step], ctx: StudyContext, on_start=None, on_done=None) -> None:
        if not steps:
            return
        ray = import_ray()
        connected_here, started_here = self._connect(ray)
        try:
            with _stop_on_sigterm():
                self._run_tasks(ray, steps, ctx, on_start, on_done)
        finally:
            session = _session_dir(ray) if started_here else None
            if connected_here:
                ray.shutdown()
            if started_here:
                _reap(session, grace_s=5)  # agents that outlive ray.shutdown() do not outlive this run
                _forget_session(session)

    def _run_tasks(self, ray, steps: list[Step], ctx: StudyContext, on_start, on_done) -> None:
        refs: dict = {}
        try:
            cwd = os.getcwd()
            self._check_nodes(ray, ctx.out_dir, cwd)
            resources = self._resources(ray, ctx.study, steps, ctx.device)
            retries = self.max_retries if self.max_retries is not None else \
                ctx.study.get("executor", {}).get("max_retries", 3)
            remote_ctx = ray.put(StudyContext(ctx.study, ctx.out_dir, ctx.device, ctx.data, False, ctx.steps,
                                              log=ctx.log))
            task = ray.remote(_run_step)
            by_ref = {}
            most_cpus = max(n["Resources"].get("CPU", 1) for n in ray.nodes() if n.get("Alive"))
            for step in steps:  # plan order is dependency order; Ray starts each task once its inputs are done
                inputs = [refs[i] for i in step.inputs if i in refs]
                # OMP_NUM_THREADS=1 runs more one-thread steps at once (a CPU per thread: task_options).
                ref = task.options(**self.task_options(step, resources, most_cpus, retries)).remote(
                    step, remote_ctx, cwd, *inputs)
                refs[step.id], by_ref[ref] = ref, step
            pending = list(by_ref)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                step = by_ref[done[0]]
                try:
                    result = ray.get(done[0])
                except Exception as exc:  # noqa: BLE001 - a failed step stops the study like a local one
                    for ref in pending:
                        ray.cancel(ref, force=True)
                    raise _step_error(ray, step, exc) from None
                # No on_start: Ray starts a task when its inputs are done, and the driver only learns it finished.
                if on_done:
                    on_done(step, result["seconds"], f"{result['summary']} (node {result['node']})")
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: stop the steps still running, then let the caller clean up
            for ref in refs.values():
                ray.cancel(ref, force=True)
            raise


def _check_reachable(address: str) -> None:
    """Fail within CONNECT_TIMEOUT_S when nothing listens at ``address`` (host:port, or ray://host:port): Ray's
    own connect retries a dead or misspelt address for minutes, deaf to SIGTERM."""
    if address == "auto":
        return  # Ray looks for a local cluster and says at once when there is none
    host, _, port = address.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not host or not port.isdigit():
        raise UserError(f"--address {address!r} is not host:port (or auto)")
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
            return
        except socket.gaierror:
            raise UserError(f"--address {address}: no such host {host!r}; give the head node's host:port "
                            "(as 'ray start --head' printed it)") from None
        except OSError as exc:
            if time.monotonic() > deadline:
                raise UserError(f"--address {address}: nothing answers there ({exc.strerror or exc}) after "
                                f"{CONNECT_TIMEOUT_S} s; start the cluster with 'ray start --head' or fix the "
                                "address") from None
            time.sleep(1)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every finally (Ray's shutdown, the --out lock) runs."""


@contextmanager
def _stop_on_sigterm():
    def stop(signum, frame):
        raise _Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: the caller handles signals
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------- local clusters that outlive their driver
def _sessions_file() -> Path:
    from transferlab.data import default_cache_dir

    return default_cache_dir() / SESSIONS_FILE


def _session_dir(ray) -> str | None:
    try:
        return ray._private.worker._global_node.get_session_dir_path()
    except AttributeError:
        return None


def _read_sessions() -> dict:
    try:
        sessions = json.loads(_sessions_file().read_text())
    except (OSError, ValueError):
        return {}
    return sessions if isinstance(sessions, dict) else {}


def _write_sessions(sessions: dict) -> None:
    from transferlab import store

    try:
        store.atomic_write_json(_sessions_file(), sessions)
    except OSError:
        pass  # only a cleanup aid: a read-only cache costs leftovers after a SIGKILL, nothing more


def _remember_session(ray) -> None:
    session = _session_dir(ray)
    if session:
        _write_sessions({**_read_sessions(), session: os.getpid()})


def _forget_session(session: str | None) -> None:
    sessions = _read_sessions()
    if session in sessions:
        del sessions[session]
        _write_sessions(sessions)


def session_processes(session: str) -> list[int]:
    """Pids of the processes of a local Ray session: its own processes name its session folder."""
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if session in cmdline and int(entry.name) != os.getpid():
            pids.append(int(entry.name))
    return pids


def reap_orphaned_sessions() -> list[int]:
    """Kill what is left of local Ray clusters whose driver died without shutting them down (SIGKILL): the
    GCS, raylet and agents of a session whose driver pid no longer runs. Returns the pids signalled."""
    sessions, killed = _read_sessions(), []
    for session, driver in list(sessions.items()):
        if _alive(driver):
            continue
        killed += _reap(session)
        del sessions[session]
    if killed or len(sessions) != len(_read_sessions()):
        _write_sessions(sessions)
    return killed


def _reap(session: str | None, grace_s: float = 0) -> list[int]:
    """SIGKILL the processes of ``session`` still running after ``grace_s`` seconds; returns their pids."""
    if not session:
        return []
    deadline = time.monotonic() + grace_s
    while session_processes(session) and time.monotonic() < deadline:
        time.sleep(0.2)
    killed = []
    for pid in session_processes(session):
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except OSError:
            pass
    return killed


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError, TypeError):
        return False
    return True


def _step_error(ray, step: Step, exc: Exception) -> Exception:
    """The step's own error (a UserError stays one line); a worker that died past its retries, said so."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, UserError):
        return cause
    if isinstance(exc, (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError)):
        return UserError(f"step {step.id}: its Ray worker died on every try ({exc.__class__.__name__}); "
                         f"run the study again to resume, or raise [executor] max_retries")
    return cause if isinstance(cause, Exception) else exc


def make_executor(name: str = "local", *, address: str | None = None, jobs: int | None = None,
                  step_resources: str | None = None, resources: StepResources | None = None):
    """The executor `transferlab run --executor NAME` uses; bad options are one-line errors before anything runs.
    ``resources``: the typed Ray resources of every step; ``step_resources``: the deprecated per-kind string."""
    if name not in EXECUTORS:
        raise UserError(f"unknown --executor {name!r}; use local or ray")
    per_kind = parse_resources(step_resources)
    if name == "local":
        flags = {"num_cpus": "--num-cpus", "num_gpus": "--num-gpus", "memory": "--memory",
                 "custom_resources": "--resource"}
        named = [flag for flag, value in (("--address", address), ("--jobs", jobs), ("--step-resources", step_resources))
                 if value is not None] + [flags[k] for k in given(resources)]
        if named:
            raise UserError(f"{', '.join(named)} only apply to --executor ray")
        return LocalExecutor()
    if step_resources is not None:
        warnings.warn("--step-resources is deprecated: give --num-cpus, --num-gpus, --memory or --resource NAME=AMOUNT "
                      "(every step), or a study's [executor] train / craft / eval / merge tables (one kind)",
                      FutureWarning, stacklevel=2)
    import_ray()
    return RayExecutor(address=address, jobs=jobs, resources=per_kind, settings=resources)
