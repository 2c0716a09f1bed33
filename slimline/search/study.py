"""``slimline search``: Optuna proposes trials, Ray runs them, the study is stored and resumes.

Each trial is a whole ``slimline run`` of the space's recipe at one point, in its own run folder
(``OUT/trials/0007``), so every figure a search reports was measured on a built artifact, never
estimated. A trial that times (``evaluate.speed.enabled``) reserves a whole node through the custom
resource ``slimline_node`` (one per node), so no other trial disturbs its interleaved ratios; a trial
that only measures accuracy takes one CPU and packs. The study lives in ``OUT/study.db`` (Optuna's
RDB storage, sqlite): stop it at any point (Ctrl-C, a killed driver) and the same command resumes it,
finished trials kept, interrupted ones run again.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from slimline.errors import OutputError, RecipeError, ResourceError
from slimline.search.space import Space
from slimline.stage import Reporter
from slimline.yamlconf import short

MARKER = "search-space.json"  # written first: says slimline made this folder, and for which space
NODE = "slimline_node"  # the custom resource a timing trial reserves: one per node
Log = Callable[[str], None]


# -- one trial, in a Ray worker ---------------------------------------------------------------------


class _FileReporter(Reporter):
    """A trial's progress and warnings, appended to ``trials/NNNN.log``."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def _write(self, line: str) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {line}\n")

    def info(self, message: str) -> None:
        self._write(message)

    def warn(self, message: str) -> None:
        super().warn(message)
        self._write("warning: " + message)


def run_trial(recipe: dict[str, Any], folder: str, target: str) -> dict[str, Any]:
    """Build and evaluate one trial's recipe; its figures for ``target``, its budget rows, its verdict.
    A recipe that can't run at this point (a fusion contract broken, a stage refusing) returns its
    error instead: that is the trial's result, not a fault to retry."""
    from slimline import api
    from slimline.errors import SlimlineError

    out = Path(folder)
    log = out.with_suffix(".log")
    out.with_suffix(".pid").write_text(str(os.getpid()))  # which process runs it (tests kill it there)
    reporter = _FileReporter(log)
    reporter.info(f"trial on {os.uname().nodename}, pid {os.getpid()}")
    try:
        result = api.run(recipe, out=out, force=True, reporter=reporter)
    except SlimlineError as err:
        reporter.info(f"error: {err}")
        return {"error": str(err)}
    report = result.report or {}
    return {
        "summary": (report.get("summary") or {}).get(target),
        "budgets": [b for b in report.get("budgets", []) if b.get("target") in (None, target)],
        "passed": result.passed,
        "verdict": result.verdict.state if result.verdict else None,
        "warnings": reporter.warnings[:20],
        "report": report,  # a few kB; on a cluster the run folder stays on the node that ran it
    }


# -- the folder -------------------------------------------------------------------------------------


def prepare_folder(out: Path, space: Space) -> bool:
    """Create ``out`` for a new study, or check that it holds this space's study; True when resuming.
    slimline never writes into a folder it didn't make."""
    marker = out / MARKER
    if marker.is_file():
        try:
            held = json.loads(marker.read_text())
        except (OSError, ValueError):
            raise OutputError(
                f"--out {out}: {MARKER} is unreadable; this folder can't be resumed. Choose another --out."
            ) from None
        if held.get("fingerprint") != space.fingerprint():
            raise RecipeError(
                f"--out {out} holds the study of a different search space ({held.get('space', '?')}: its recipe, "
                "parameters or objectives differ from this one's). Resume it with the space it was made with, or "
                "choose another --out for this one."
            )
        return True
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputError(
            f"--out {out}: exists and is not a slimline search folder (no {MARKER}); slimline won't write into it. "
            "Choose a new folder."
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "trials").mkdir(exist_ok=True)
    _write_atomic(
        marker,
        json.dumps(
            {
                "space": str(space.path) if space.path else "<space>",
                "fingerprint": space.fingerprint(),
                "parameters": {p.name: p.describe() for p in space.params},
                "objectives": [o.model_dump() for o in space.objectives],
                "target": space.target,
                "template": space.template,
            },
            indent=2,
            default=str,
        ),
    )
    return False


def _write_atomic(path: Path, text: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(text, bytes):
        tmp.write_bytes(text)
    else:
        tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@contextlib.contextmanager
def exclusive(out: Path) -> Iterator[None]:
    """One driver per study: a second ``slimline search`` on the same folder is refused, not queued."""
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise OutputError(
                    f"--out {out}: another slimline search is running on this study. Wait for it, or stop it."
                ) from None
            raise
        yield
    finally:
        os.close(fd)


# -- the study --------------------------------------------------------------------------------------


def _violation(row: dict[str, Any]) -> float:
    """How far a budget row misses its limit, relative to it (0 when met): Optuna's samplers prefer
    trials that miss by less."""
    if row.get("passed"):
        return 0.0
    value, limit = row.get("value"), row.get("limit")
    if isinstance(value, int | float) and isinstance(limit, int | float) and limit:
        return max(abs(float(value) - float(limit)) / abs(float(limit)), 1e-6)
    return 1.0


def open_study(space: Space, out: Path) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = space.spec
    kind = spec.sampler
    if kind == "auto":
        kind = "tpe" if len(space.objectives) == 1 else "nsga2"
    if kind == "tpe":
        sampler = optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=spec.startup_trials, multivariate=True)
    elif kind == "nsga2":
        sampler = optuna.samplers.NSGAIISampler(seed=spec.seed, population_size=max(4, spec.startup_trials))
    else:
        sampler = optuna.samplers.RandomSampler(seed=spec.seed)
    storage = optuna.storages.RDBStorage(f"sqlite:///{(out / 'study.db').resolve()}")
    return optuna.create_study(
        study_name=space.name,
        storage=storage,
        sampler=sampler,
        directions=[o.direction for o in space.objectives],
        load_if_exists=True,
    )


def recover(study: Any, log: Log) -> int:
    """Trials left RUNNING by a driver that stopped: marked failed (``interrupted``) and their
    parameters queued again, so the resumed study runs them first and loses no finished trial."""
    from optuna.trial import TrialState

    stale = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
    for t in stale:
        study._storage.set_trial_user_attr(t._trial_id, "error", "interrupted: the search stopped while it ran; queued again")
        study.tell(t.number, state=TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"rerun_of": t.number})
    if stale:
        log(f"search: {len(stale)} interrupted trial(s) queued again: {', '.join(str(t.number) for t in stale)}")
    return len(stale)


def metric(summary: dict[str, Any] | None, name: str) -> float | None:
    node: Any = summary
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, int | float) or not math.isfinite(node):
        return None
    return float(node)


# -- Ray ----------------------------------------------------------------------------------------------


def start_ray(address: str | None, log: Log) -> bool:
    """Connect to the cluster at ``address`` (or ``RAY_ADDRESS``), else start a local Ray in-process
    with one ``slimline_node``. True when this process started it (and so shuts it down)."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return False
    if address:
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise ResourceError(
                f"--address {address}: can't reach a Ray cluster there ({short(str(err), 200)}). Start one with "
                f"`ray start --head --resources '{{\"{NODE}\": 1}}'`, or leave --address out for a local Ray."
            ) from None
        log(f"search: connected to the Ray cluster at {address}")
        return False
    ray.init(
        num_cpus=os.cpu_count() or 1,
        resources={NODE: 1},
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    log(f"search: started a local Ray ({os.cpu_count()} CPUs, 1 {NODE})")
    return True


def capacity(timing: bool, parallel: int | None) -> int:
    import ray

    resources = ray.cluster_resources()
    nodes, cpus = int(resources.get(NODE, 0)), int(resources.get("CPU", 0))
    if timing and nodes == 0:
        raise ResourceError(
            f"the Ray cluster has no `{NODE}` resource, and this search's trials time their artifacts (each reserves a "
            f"whole node so no other trial disturbs its timings). Start each node with `ray start ... --resources "
            f"'{{\"{NODE}\": 1}}'`, or set evaluate.speed.enabled: false for accuracy-only trials."
        )
    room = nodes if timing else max(cpus, 1)
    return min(parallel, room) if parallel else room


# -- the loop -----------------------------------------------------------------------------------------


class StopRequests:
    """Ctrl-C and SIGTERM become a flag the driver's loop checks between Ray calls. A KeyboardInterrupt
    raised inside Ray's or Optuna's own calls can be swallowed there (a study once ran on to its end
    after SIGINT); the loop then raises it itself, where the cleanup is."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._request)

    def _request(self, signum: int, frame: Any) -> None:
        self.requested = True

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()


@dataclass
class Outcome:
    folder: Path
    trials: list[dict[str, Any]]
    front: list[int]
    best: dict[str, Any] | None
    interrupted: bool = False


def search(
    space: Space,
    out: str | Path,
    *,
    trials: int | None = None,
    address: str | None = None,
    parallel: int | None = None,
    log: Log = print,
) -> Outcome:
    """Run (or resume) the study until it holds ``trials`` finished or failed trials; then write the
    Pareto front and the best recipe that meets the budgets."""
    import ray
    from optuna.trial import TrialState

    out = Path(out)
    resuming = prepare_folder(out, space)
    with exclusive(out):
        study = open_study(space, out)
        if resuming:
            log(f"search: resuming {out} ({len(study.trials)} trials on record)")
        recover(study, log)
        total = trials or space.spec.trials
        started = start_ray(address, log)
        timing = bool(space.materialize(space.defaults()).get("evaluate", {}).get("speed", {}).get("enabled", True))
        room = capacity(timing, parallel or space.spec.parallel)
        options: dict[str, Any] = {"num_cpus": 1, "max_retries": space.spec.retries, "retry_exceptions": False}
        if timing:
            options["resources"] = {NODE: 1}
        task = ray.remote(run_trial).options(**options)
        log(
            f"search: {total} trials, {room} at a time ({'timing: one per node' if timing else 'accuracy only: one per CPU'}); "
            f"objectives {', '.join(f'{o.direction} {o.metric}' for o in space.objectives)} on {space.target}"
        )
        pending: dict[Any, tuple[Any, float]] = {}
        distributions = space.distributions()
        interrupted = False
        stop = StopRequests()
        try:
            last = time.monotonic()
            while True:
                stop.check()
                done_count = sum(1 for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.FAIL))
                if done_count + len(pending) < total and len(pending) < room:
                    trial = study.ask(distributions)
                    folder = out / "trials" / f"{trial.number:04d}"
                    recipe = space.materialize(trial.params, name=f"{space.name}-t{trial.number}")
                    trial.set_user_attr("folder", str(folder.relative_to(out)))
                    pending[task.remote(recipe, str(folder.resolve()), space.target)] = (trial, time.monotonic())
                    log(f"search: trial {trial.number} started: {_params_text(space, trial.params)}")
                    continue
                if not pending:
                    break
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=1)
                if not ready:
                    if time.monotonic() - last >= 25:
                        running = ", ".join(f"{t.number} ({time.monotonic() - s:.0f}s)" for t, s in pending.values())
                        log(f"search: {done_count}/{total} trials done; running {running}")
                        last = time.monotonic()
                    continue
                for ref in ready:
                    trial, t0 = pending.pop(ref)
                    _finish(study, space, trial, ref, time.monotonic() - t0, log)
                last = time.monotonic()
        except KeyboardInterrupt:
            interrupted = True
            for ref, (trial, _) in pending.items():
                ray.cancel(ref, force=True)
                trial.set_user_attr("error", "interrupted: the search stopped while it ran; queued again")
                study.tell(trial, state=TrialState.FAIL)
                study.enqueue_trial(trial.params, user_attrs={"rerun_of": trial.number})
            pending.clear()
            log("search: interrupted; the study is kept: run the same command again to resume it")
        finally:
            stop.restore()
            if started:
                ray.shutdown()
        outcome = write_results(study, space, out, log)
        outcome.interrupted = interrupted
        if interrupted:
            raise KeyboardInterrupt
        return outcome


def _params_text(space: Space, params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in space.describe(params).items() if v != "-")


def _finish(study: Any, space: Space, trial: Any, ref: Any, seconds: float, log: Log) -> None:
    import ray
    from optuna.trial import TrialState

    trial.set_user_attr("seconds", round(seconds, 1))
    try:
        result = ray.get(ref)
    except ray.exceptions.RayError as err:  # the worker or node died past its retries, or a bug raised
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        reason = f"{type(err).__name__}: {short(first, 300)}"
        trial.set_user_attr("error", reason)
        study.tell(trial, state=TrialState.FAIL)
        log(f"search: trial {trial.number} failed after {seconds:.0f}s ({reason})")
        return
    if "error" in result:
        trial.set_user_attr("error", short(result["error"], 1000))
        study.tell(trial, state=TrialState.FAIL)
        log(f"search: trial {trial.number} failed: {short(result['error'], 300)}")
        return
    values = [metric(result["summary"], o.metric) for o in space.objectives]
    failed = [b for b in result["budgets"] if not b.get("passed")]
    trial.set_user_attr("figures", {k: v for k, v in (result["summary"] or {}).items() if isinstance(v, int | float | dict)})
    trial.set_user_attr("passed", bool(result["passed"]))
    trial.set_user_attr("failed_budgets", [f"{b['name']}: {b.get('value')} (limit {b.get('limit')})" for b in failed])
    for i, b in enumerate(result["budgets"]):  # the samplers steer away from trials that break a budget
        trial.set_constraint(f"{i}:{b['name']}@{b.get('target')}", _violation(b))
    if any(v is None for v in values):
        missing = [o.metric for o, v in zip(space.objectives, values, strict=True) if v is None]
        trial.set_user_attr("error", f"the run measured no {', '.join(missing)} for {space.target}")
        study.tell(trial, state=TrialState.FAIL)
        log(f"search: trial {trial.number} failed: no {', '.join(missing)} in its report")
        return
    study.tell(trial, values)
    verdict = "meets the budgets" if result["passed"] else "breaks " + "; ".join(trial.user_attrs["failed_budgets"])
    figures = ", ".join(f"{o.metric} {v:.4g}" for o, v in zip(space.objectives, values, strict=True))
    log(f"search: trial {trial.number} done in {seconds:.0f}s: {figures}; {verdict}")


# -- results ------------------------------------------------------------------------------------------


def _dominates(a: list[float], b: list[float], signs: list[float]) -> bool:
    better_or_equal = all(s * x >= s * y for x, y, s in zip(a, b, signs, strict=True))
    return better_or_equal and any(s * x > s * y for x, y, s in zip(a, b, signs, strict=True))


def write_results(study: Any, space: Space, out: Path, log: Log) -> Outcome:
    """``results.json`` (every trial), ``pareto.md``/``.png`` (the feasible front), ``best.yaml`` (the
    front's best trial on the first objective, as a recipe with its choices spelled out)."""

    signs = [1.0 if o.direction == "maximize" else -1.0 for o in space.objectives]
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append(
            {
                "number": t.number,
                "state": t.state.name.lower(),
                "params": {p.name: t.params[p.name] for p in space.params if p.name in t.params},
                "values": list(t.values) if t.values else None,
                "passed": t.user_attrs.get("passed"),
                "failed_budgets": t.user_attrs.get("failed_budgets", []),
                "error": t.user_attrs.get("error"),
                "seconds": t.user_attrs.get("seconds"),
                "folder": t.user_attrs.get("folder"),
                "rerun_of": t.user_attrs.get("rerun_of"),
            }
        )
    feasible = [r for r in rows if r["state"] == "complete" and r["passed"]]
    front = [r["number"] for r in feasible if not any(_dominates(q["values"], r["values"], signs) for q in feasible)]
    best = max((r for r in feasible if r["number"] in front), key=lambda r: signs[0] * r["values"][0], default=None)
    _write_atomic(
        out / "results.json",
        json.dumps(
            {
                "space": space.name,
                "target": space.target,
                "objectives": [o.model_dump() for o in space.objectives],
                "trials": rows,
                "front": front,
                "best": best["number"] if best else None,
            },
            indent=2,
        ),
    )
    _write_atomic(out / "pareto.md", _markdown(space, rows, front, best))
    if len(space.objectives) >= 2 and any(r["values"] for r in rows):
        _plot(space, rows, front, out / "pareto.png")
    if best:
        recipe = space.materialize(best["params"], name=f"{space.name}-best")
        header = [
            f"# Found by `slimline search` ({space.name}), trial {best['number']} of {len(rows)}: on the Pareto front of the",
            "# trials that met the budgets, the best on the first objective. Measured (not estimated) in its run folder:",
            f"#   {best['folder']}",
            *(f"#   {o.metric} ({o.direction}): {v:.6g}" for o, v in zip(space.objectives, best["values"], strict=True)),
            "# The searched choices:",
            *(f"#   {line}" for line in _params_text(space, best["params"]).split(", ")),
        ]
        _write_atomic(out / "best.yaml", "\n".join(header) + "\n" + yaml.safe_dump(recipe, sort_keys=False))
        log(f"search: best trial {best['number']} -> {out / 'best.yaml'}")
    else:
        (out / "best.yaml").unlink(missing_ok=True)
        log("search: no trial met the budgets yet; no best.yaml written")
    log(
        f"search: {sum(r['state'] == 'complete' for r in rows)} complete, {sum(r['state'] == 'fail' for r in rows)} failed, "
        f"{len(feasible)} within budgets, {len(front)} on the front -> {out / 'pareto.md'}"
    )
    return Outcome(out, rows, front, best)


def _markdown(space: Space, rows: list[dict], front: list[int], best: dict | None) -> str:
    names = [p.name for p in space.params]
    head = [
        "trial",
        "state",
        *[f"{o.metric} ({'max' if o.direction == 'maximize' else 'min'})" for o in space.objectives],
        "budgets",
        *names,
    ]
    lines = [
        f"# slimline search: {space.name}",
        "",
        f"Target {space.target}. Front: the trials that met every budget and that no other such trial beats on all "
        "objectives (marked *). Every figure was measured in the trial's own run folder.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in sorted(rows, key=lambda r: (r["number"] not in front, r["number"])):
        mark = "*" if r["number"] in front else ""
        values = [f"{v:.4g}" for v in r["values"]] if r["values"] else ["-"] * len(space.objectives)
        budget = "met" if r["passed"] else ("; ".join(r["failed_budgets"]) or (short(r["error"], 120) if r["error"] else "-"))
        params = list(space.describe(r["params"]).values())
        lines.append("| " + " | ".join([f"{r['number']}{mark}", r["state"], *values, budget.replace("|", "/"), *params]) + " |")
    if best:
        lines += ["", f"Best (first objective, on the front): trial {best['number']}, written as `best.yaml`."]
    return "\n".join(lines) + "\n"


def _plot(space: Space, rows: list[dict], front: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_o, y_o = space.objectives[0], space.objectives[1]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for r in rows:
        if not r["values"]:
            continue
        x, y = r["values"][0], r["values"][1]
        on = r["number"] in front
        ax.scatter(
            x, y, marker="o" if r["passed"] else "x", color="tab:green" if on else ("tab:gray" if r["passed"] else "tab:red")
        )
        ax.annotate(str(r["number"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    pts = sorted((r["values"][0], r["values"][1]) for r in rows if r["number"] in front)
    if len(pts) > 1:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "--", color="tab:green", linewidth=1, label="front (within budgets)")
        ax.legend(fontsize=8)
    ax.set_xlabel(f"{x_o.metric} ({'higher' if x_o.direction == 'maximize' else 'lower'} is better)")
    ax.set_ylabel(f"{y_o.metric} ({'higher' if y_o.direction == 'maximize' else 'lower'} is better)")
    ax.set_title(f"slimline search {space.name} on {space.target}: x = breaks a budget", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
