"""The ``slimline`` command: parse, call the library, print. Exit codes: 0 ok, 1 budgets failed,
2 a user error (printed as one paragraph, no traceback), 130 interrupted."""

from __future__ import annotations

import errno
import functools
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from slimline import __version__
from slimline.errors import SlimlineError

console = Console()
err_console = Console(stderr=True)
MAX_MESSAGE = 4000  # characters: an error never echoes unbounded input


def _say_error(message: str, code: int = 2) -> NoReturn:
    """One paragraph on stderr, printed as plain text (a path like `tiny[ft-v2]` is not markup)."""
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 3] + "..."
    err_console.print(Text("error: ", style="bold red") + Text(message), highlight=False, soft_wrap=True)
    sys.stdout.flush()
    sys.exit(code)


def _os_error(err: OSError) -> str:
    """An environment failure (full disk, permissions, a read-only or special file system) in words."""
    where = f" ({err.filename})" if err.filename else ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return (
            f"no space left on the device{where}: the run stopped and nothing half-written was kept. Free some space, "
            "or point --out (and TMPDIR, for scratch) at a disk with room."
        )
    if err.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied{where}. Choose a folder you can write, or fix its permissions."
    if err.errno == errno.EROFS:
        return f"the file system is read-only{where}. Choose a writable folder."
    return f"{err.strerror or type(err).__name__}{where}. Check the path and the disk, then run again."


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _leave_interrupted(what: str) -> NoReturn:
    # The command's own cleanup is done (finally blocks ran). Ignore further signals and leave without
    # the interpreter's shutdown: under heavy load a fresh-clone suite twice saw the process end by
    # SIGINT (status -2) after this message, i.e. a KeyboardInterrupt raised where nothing can catch it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    err_console.print(Text("interrupted", style="red") + Text(f": {what}"))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


def guarded(interrupted: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The one error path of every command: a user's mistake or an environment failure ends with one
    plain paragraph and exit 2, an interrupt (Ctrl-C, SIGTERM from a cancelled CI job) with exit 130
    after the command's cleanup; never a traceback. Exit 1 is reserved for "a budget failed"."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            signal.signal(signal.SIGTERM, _interrupt)
            try:
                return fn(*args, **kwargs)
            except SlimlineError as err:
                _say_error(str(err), err.exit_code)
            except KeyboardInterrupt:
                _leave_interrupted(interrupted)
            except MemoryError:
                _say_error("out of memory. Lower the batch sizes or lengths in the recipe, or use a machine with more memory.")
            except OSError as err:
                _say_error(_os_error(err))
            except RecursionError:
                _say_error("an input is nested too deeply to be read (a recipe, report or data file). Check the files given.")
            except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
                raise
            except Exception as err:  # noqa: BLE001 - the last line of defence; SLIMLINE_DEBUG=1 shows the traceback
                if os.environ.get("SLIMLINE_DEBUG"):
                    raise
                first = (str(err).strip().splitlines() or [""])[0][:300]
                _say_error(
                    f"slimline could not finish: {type(err).__name__}: {first}. If the inputs are valid, this is a bug "
                    "in slimline: run again with SLIMLINE_DEBUG=1 for the traceback, and report it."
                )

        return command

    return wrap


def _load_recipe(recipe: str, overrides: tuple[str, ...], model: str | None = None, task: str | None = None):
    from slimline.api import load_recipe

    return load_recipe(recipe, overrides, model, task)


MODEL_OPTION = click.option(
    "--model",
    "model",
    metavar="SOURCE",
    help="run the recipe on this model: a local HF folder, a GGUF file, pip:<package> or hf:org/name@rev",
)
TASK_OPTION = click.option(
    "--task",
    "task",
    type=click.Choice(["feature-extraction", "text-classification", "token-classification", "text-generation"]),
    help="the model's task, when it differs from the recipe's",
)


def _print_verdict(report: dict, report_md: Path) -> None:
    """Print a finished evaluation's report and exit 1 if a budget failed (0 otherwise)."""
    from slimline.evaluate.report import verdict

    click.echo(report_md.read_text())
    word = verdict(report)
    if word == "FAILED":
        for b in report["budgets"]:
            if not b["passed"]:
                line = f"budget failed: {b['name']} [{b['target']}]: value {b['value']} vs limit {b['limit']} {b.get('note', '')}"
                err_console.print(Text(line, style="red"), highlight=False)
        sys.exit(1)
    if word == "NO BUDGETS":
        err_console.print(
            Text("NO BUDGETS: the report checks nothing, so nothing passed or failed. Add evaluate.budgets to gate on it."),
            style="yellow",
        )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="slimline")
def main() -> None:
    """slimline: compress a fine-tuned model, compile it to fused ONNX, and measure what it cost."""


@main.command()
@click.argument("recipe")
@click.option("--out", "out", type=click.Path(path_type=Path), help="run folder (default: runs/<recipe name>)")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="override a recipe value, e.g. stages.2.quantize.dynamic_int8.per_channel=false",
)
@MODEL_OPTION
@TASK_OPTION
@click.option("--force", is_flag=True, help="replace an existing run folder")
@click.option("--no-eval", is_flag=True, help="build the artifact only; skip evaluation")
@guarded("no output folder was written.")
def run(
    recipe: str, out: Path | None, overrides: tuple[str, ...], model: str | None, task: str | None, force: bool, no_eval: bool
) -> None:
    """Run RECIPE (a YAML file or a built-in recipe name) and write the run folder."""
    from slimline import api
    from slimline.progress import RichReporter

    with RichReporter(err_console) as reporter:
        result = api.run(
            recipe, out, overrides=overrides, model=model, task=task, force=force, evaluate=not no_eval, reporter=reporter
        )
    console.print(Text("run folder: ") + Text(str(result.folder), style="bold"))
    if result.report:
        _print_verdict(result.report, result.folder / "report.md")


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override the run's recipe, e.g. evaluate.targets=[ort-cuda]"
)
@guarded("the run folder was left as it was (no report was replaced).")
def evaluate(run_dir: Path, overrides: tuple[str, ...]) -> None:
    """Evaluate RUN_DIR's artifact again on this machine (built elsewhere with `run --no-eval`)."""
    from slimline import api
    from slimline.progress import RichReporter

    with RichReporter(err_console) as reporter:
        result = api.evaluate(run_dir, overrides, reporter)
    _print_verdict(result.report, run_dir / "report.md")


@main.command()
@click.argument("recipe")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
@MODEL_OPTION
@TASK_OPTION
@guarded("nothing was written.")
def validate(recipe: str, overrides: tuple[str, ...], model: str | None, task: str | None) -> None:
    """Check RECIPE without running it (keys, types, stage order)."""
    from slimline.recipe import dump

    path, parsed = _load_recipe(recipe, overrides, model, task)
    console.print(Text(f"{path}: valid ({len(parsed.stages)} stages)"))
    click.echo(dump(parsed))


@main.command("recipes")
@guarded("nothing was written.")
def list_recipes() -> None:
    """List the built-in recipes."""
    from slimline.builtin import builtin_recipes
    from slimline.recipe import load

    table = Table("name", "model", "stages", "description")
    for name, path in builtin_recipes().items():
        try:
            r = load(path)
            table.add_row(name, r.model.source, " -> ".join(s.kind for s in r.stages), r.description)
        except SlimlineError as err:
            table.add_row(name, "?", Text(f"invalid: {err}", style="red"), "")
    console.print(table)


def _print_model(m: dict, say) -> None:  # noqa: ANN001
    """``slimline inspect MODEL``: what the model is and what slimline can do with it (no weights loaded)."""
    params = f"{m['parameters'] / 1e6:,.1f}M parameters" if m.get("parameters") else "parameters unknown"
    say(f"{m['source']} ({m['format']}, {m['path']})")
    say(f"  {m.get('model_type')} {m['family']}, task {m['task']}, {params}, {m.get('size_mb', '?')} MB on disk")
    shape = {k: m.get(k) for k in ("layers", "hidden_size", "heads", "kv_heads", "vocab_size", "max_positions") if m.get(k)}
    if shape:
        say("  " + ", ".join(f"{k} {v}" for k, v in shape.items()))
    if m.get("memory_mb"):
        say(
            f"  memory: {m['memory_mb']['float32_weights']:,} MB of float32 weights, about {m['memory_mb']['run_peak_estimate']:,} MB at a run's peak"
        )
    if m.get("fusions"):
        expected = ", ".join(f"{op} {n}" for op, n in m["fusions"]["expected"].items()) or "none known"
        say(f"  fusion contract (expect: auto): {expected}")
    say("  supported: " + ("yes" if m["supported"] and not m["unsupported"] else "no" if not m["supported"] else "with problems"))
    for why in m["unsupported"]:
        say(f"  - {why}")


def _print_fusions(info: dict) -> None:
    """The fusion report as tables; every value is printed as plain text (node names are not markup)."""
    t = Text
    console.print(
        t(info["path"], style="bold") + t(f"  {info['nodes']['before']} nodes -> {info['nodes']['after']} after slimline's rules")
    )
    counts = Table("fused op", "in the file", "after the rules")
    for op in dict.fromkeys([*info["already_fused"], *info["fused_after_rules"]]):
        counts.add_row(t(op), str(info["already_fused"].get(op, 0)), str(info["fused_after_rules"].get(op, 0)))
    console.print(counts)
    console.print(t("rules that matched: " + (", ".join(f"{k} x{v}" for k, v in info["rules"].items()) or "none")))
    for note in info.get("tuned", []):
        console.print(t("compile.tune left these unfused on purpose: ", style="yellow") + t(note))
    matched = Table("fused op", "where")
    for m in info["matched"]:
        matched.add_row(t(m["op"]), t(m["where"]))
    console.print(matched)
    if info["unfused"]:
        unfused = Table("not fused", "where", "node", "closest rule", "why not", title="candidates left unfused")
        for u in info["unfused"]:
            unfused.add_row(t(u["op"]), t(u["where"]), t(u["node"]), t(u["rule"] or "-"), t(u["reason"]))
        console.print(unfused)
    else:
        console.print(t("no unfused candidates", style="green"))


@main.command()
@click.argument("source")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="the artifact folder to create (must not exist)")
@click.option(
    "--bits",
    type=click.Choice(["4", "8", "float"]),
    default="4",
    show_default=True,
    help="weight bits (float: the fused fp32 graph)",
)
@click.option(
    "--algorithm",
    type=click.Choice(["rtn", "hqq", "gptq"]),
    default="rtn",
    show_default=True,
    help="gptq: calibrated on the built-in Shakespeare, carried layer by layer",
)
@click.option(
    "--calibration-windows",
    default=128,
    show_default=True,
    type=click.IntRange(1),
    help="gptq: windows of calibration text (many short windows calibrate better than a few long ones)",
)
@click.option("--clip-search", is_flag=True, help="gptq: per block, shrink the range where that lowers the rounding error")
@click.option(
    "--max-layer-error",
    type=click.FloatRange(0, 1, min_open=True),
    help="gptq: a layer group whose relative output error exceeds this goes to 8 bits (blocks of 64)",
)
@click.option("--calibration-length", default=128, show_default=True, type=click.IntRange(16), help="gptq: tokens per window")
@click.option("--block-size", type=click.Choice(["32", "64", "128"]), default="32", show_default=True)
@click.option(
    "--kernel",
    type=click.Choice(["ort", "slimline"]),
    default="ort",
    show_default=True,
    help="slimline: 4-bit weights in blocks of 32 go to slimline's CPU kernel MatMulQ4 (float minimums; `slimline ops build`)",
)
@click.option("--shard-mb", type=click.IntRange(64), help="split the external weights into files of at most this many MB")
@click.option(
    "--verify",
    "check",
    is_flag=True,
    help="then compare logits with transformers on the same weights (module by module) and time batch-1 decode",
)
@click.option("--threads", default=0, type=click.IntRange(0), help="threads for --verify (0: all cores)")
@click.option(
    "--perplexity-tokens",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="--verify: also perplexity on the built-in Shakespeare's held-out plays, float vs artifact (each window reads every weight)",
)
@guarded("the partial output folder was removed; nothing else was touched.")
def stream(
    source: str,
    out: Path,
    bits: str,
    algorithm: str,
    calibration_windows: int,
    calibration_length: int,
    clip_search: bool,
    max_layer_error: float | None,
    block_size: str,
    kernel: str,
    shard_mb: int | None,
    check: bool,
    threads: int,
    perplexity_tokens: int,
) -> None:
    """Build a decoder of any size into a fused int4 ONNX model in bounded memory (weights read and
    quantized one at a time from SOURCE's safetensors; a local folder, pip: or hf: source)."""
    import json

    from slimline import streaming
    from slimline.models.loader import from_gguf, resolve_source

    where = resolve_source(source)
    if isinstance(where, str):  # hf:
        from slimline.models.loader import hub_snapshot

        where, _ = hub_snapshot(where, None)
    elif where.suffix == ".gguf":
        where = from_gguf(where)

    def log(message: str) -> None:
        err_console.print(message, markup=False, highlight=False)

    report = streaming.build(
        where,
        out,
        bits=None if bits == "float" else int(bits),
        algorithm=algorithm,
        block_size=int(block_size),
        kernel=kernel,
        shard_mb=shard_mb,
        calibration_windows=calibration_windows,
        calibration_length=calibration_length,
        clip_search=clip_search,
        max_layer_error=max_layer_error,
        log=log,
    )
    if check:
        report.update(streaming.verify(out, where, threads=threads, perplexity_tokens=perplexity_tokens, log=log))
        (out / "build.json").write_text(json.dumps(report, indent=2))
    click.echo(json.dumps(report, indent=2))


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of tables")
@click.option("--fusions", is_flag=True, help="which fusion rules match where, and why the others don't")
@guarded("nothing was written.")
def inspect(path: Path, as_json: bool, fusions: bool) -> None:
    """Op counts, size, inputs/outputs and the manifest summary of an ONNX file or run folder."""
    from slimline.evaluate.report import VERDICT_WORD
    from slimline.inspection import inspect_fusions, inspect_path

    info = inspect_fusions(path) if fusions else inspect_path(path)
    if fusions and not as_json:
        _print_fusions(info)
        return
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    say = functools.partial(console.print, markup=False, highlight=False)
    if "model" in info:
        _print_model(info["model"], say)
        return
    say(f"{info['path']}  {info['size_mb']} MB, {info['nodes']} nodes, opsets {info['opsets']}")
    io = Table("", "name", "type", "shape")
    for kind in ("inputs", "outputs"):
        for v in info[kind]:
            io.add_row(kind[:-1], Text(v["name"]), v["type"], Text(str(v["shape"])))
    console.print(io)
    ops = Table("op", "count")
    for op, n in info["ops"].items():
        ops.add_row(Text(op), str(n))
    console.print(ops)
    if "manifest" in info:
        m = info["manifest"]
        say(f"recipe {m['recipe']} on {m['model']}, finished {m['finished']}")
        say("stages: " + ", ".join(f"{s['kind']} ({s['wall_s']}s)" for s in m["stages"]))
        say("versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
    if "report" in info:
        r = info["report"]
        note = " (recomputed; the stored verdict differs)" if r.get("stored_verdict_differs") else ""
        say(f"report: {VERDICT_WORD[r['verdict']]}{note}")
        for target, s in r["summary"].items():
            figures = {
                k: s.get(k) for k in ("mean_cosine", "top10_overlap", "speedup", "traffic_speedup", "peak_rss_mb", "size_mb")
            }
            say(f"  {target}: " + ", ".join(f"{k} {v}" for k, v in figures.items() if v is not None))


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--budget",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="add or tighten a budget, e.g. min_speedup=2, max_accuracy_drop.spearman=2%, targets.ort-cuda.min_speedup=3",
)
@click.option("--require", multiple=True, metavar="TARGET", help="fail if this target was skipped (e.g. ort-cuda)")
@click.option("--junit", type=click.Path(path_type=Path), help="write JUnit XML, one test case per budget")
@guarded("nothing was written.")
def check(run_dir: Path, overrides: tuple[str, ...], require: tuple[str, ...], junit: Path | None) -> None:
    """Check RUN_DIR's budgets: exit 0 if all hold, 1 if any fails, 2 for bad input."""
    from slimline import api
    from slimline.evaluate.gate import junit_xml, write_junit
    from slimline.evaluate.report import budget_line

    result = api.check(run_dir, overrides, require)
    if result.verdict.state == "no budgets":
        raise SlimlineError(
            f"{run_dir}: no budgets to check. Set evaluate.budgets in the recipe or pass --budget, "
            "e.g. --budget min_speedup=1.5 --budget max_fidelity_drop=0.01."
        )
    report, rows = result.report, result.verdict.rows
    for row in rows:
        console.print(budget_line(row), style="green" if row["passed"] else "red", markup=False, highlight=False, soft_wrap=True)
    for s in report.get("skipped_targets", []):
        if not any(r["name"] == "target_available" and r["target"] == s["target"] for r in rows):
            console.print(
                f"SKIP target {s['target']}: {s['reason']}", style="yellow", markup=False, highlight=False, soft_wrap=True
            )
    failed = sum(not r["passed"] for r in rows)
    if junit:
        write_junit(junit, junit_xml(report, rows))
    console.print(f"{len(rows) - failed} passed, {failed} failed" + (f" (JUnit: {junit})" if junit else ""), markup=False)
    sys.exit(1 if failed else 0)


@main.command()
@click.argument("space", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="the study folder: new, or one to resume")
@click.option("--trials", type=click.IntRange(1), help="trials in the study, resumed ones included (default: search.trials)")
@click.option(
    "--address", metavar="HOST:PORT", help="a Ray cluster to run the trials on (default: RAY_ADDRESS, else a local Ray)"
)
@click.option(
    "--parallel", type=click.IntRange(1), help="trials at once (default: one per node when timing, one per CPU otherwise)"
)
@MODEL_OPTION
@TASK_OPTION
@guarded("the study is kept as it was: run the same command again to resume it.")
def search(
    space: Path, out: Path, trials: int | None, address: str | None, parallel: int | None, model: str | None, task: str | None
) -> None:
    """Search SPACE (a recipe with ranges and choices) for the recipes that meet its budgets: Optuna
    proposes, Ray runs each trial as a measured run; writes the Pareto front and best.yaml to OUT."""
    from slimline.search.space import load_space
    from slimline.search.study import search as run_search

    parsed = load_space(space, model=model, task=task)

    def say(message: str) -> None:
        console.print(message, markup=False, highlight=False, soft_wrap=True)

    outcome = run_search(parsed, out, trials=trials, address=address, parallel=parallel, log=say)
    click.echo((out / "pareto.md").read_text())
    if outcome.best is None:  # exit 1, as for a failed budget
        console.print(
            f"no trial met the budgets ({len(outcome.trials)} trials; {out}/pareto.md lists why each missed). "
            "Widen the space, relax a budget, or run more trials (--trials).",
            style="red",
            markup=False,
        )
        sys.exit(1)
    console.print(f"best recipe: {out}/best.yaml (Pareto front: {out}/pareto.md, pareto.png)", markup=False)


@main.command()
@click.argument("recipe")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="a new folder for sensitivity.{md,json,png,html}")
@click.option(
    "--formats",
    default=None,
    help="candidate formats, comma-separated. Encoders: int8, int8-static, int4-32, int4-64, int4-128, fp16 (default: all). "
    "Decoders: int4-N and int8-N, the recipe's quantize.weight_only at those bits and block sizes "
    "(default: int4-32,int4-64,int4-128,int8-64)",
)
@click.option(
    "--texts",
    default=None,
    type=click.IntRange(8),
    help="texts per point: evaluation texts for an encoder (default 256); calibration texts for a decoder, "
    "packed into 128-token windows (default 96)",
)
@click.option("--threads", default=0, type=click.IntRange(0), help="threads (0: all cores)")
@MODEL_OPTION
@TASK_OPTION
@guarded("no sensitivity report was written.")
def sensitivity(
    recipe: str, out: Path, formats: str | None, texts: int | None, threads: int, model: str | None, task: str | None
) -> None:
    """Per-layer sensitivity: every layer in every candidate format, alone, measured (output error and
    the task metric), ranked worst first."""
    from slimline.search.sensitivity import sensitivity as run_sensitivity

    def say(message: str) -> None:
        console.print(message, markup=False, highlight=False, soft_wrap=True)

    chosen = tuple(f.strip() for f in formats.split(",") if f.strip()) if formats else None
    run_sensitivity(recipe, out, model=model, task=task, formats=chosen, texts=texts, threads=threads, log=say)
    click.echo((out / "sensitivity.md").read_text())


@main.command()
@click.argument("recipe")
@click.option(
    "--sensitivity",
    "sensitivity_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="a `slimline sensitivity` folder of this recipe",
)
@click.option(
    "--out", required=True, type=click.Path(path_type=Path), help="a new folder: each round's run, mixed.yaml, mixed.json"
)
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(1, 10), help="choose-build-measure rounds at most")
@click.option(
    "--max-weight-mb",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="quantize.weight_only: the layer weights' bound in MB (default: what the recipe's own formats take)",
)
@MODEL_OPTION
@TASK_OPTION
@guarded("the rounds that finished are in --out; nothing else was touched.")
def mixed(
    recipe: str, sensitivity_dir: Path, out: Path, rounds: int, max_weight_mb: float | None, model: str | None, task: str | None
) -> None:
    """Mixed precision from measured sensitivities, then built and measured; writes the chosen recipe as
    mixed.yaml. quantize.dynamic_int8 / static_int8: each layer int8 or float under max_fidelity_drop (knapsack).
    quantize.weight_only (decoders): each layer's bits and block size, least summed KL within the
    recipe's own weight bytes (multiple-choice knapsack)."""
    from slimline.search.mixed import mixed as run_mixed

    def say(message: str) -> None:
        console.print(message, markup=False, highlight=False, soft_wrap=True)

    result = run_mixed(recipe, sensitivity_dir, out, model=model, task=task, rounds=rounds, max_weight_mb=max_weight_mb, log=say)
    if result.get("kind") == "weight_only":
        console.print(f"chosen recipe: {out}/mixed.yaml (run: {result['measured']['folder']})", markup=False)
        sys.exit(0 if result["measured"]["passed"] else 1)
    if result["chosen"] is None:
        console.print(
            f"no choice met max_fidelity_drop {result['budget']} in {rounds} rounds ({out}/mixed.json)", style="red", markup=False
        )
        sys.exit(1)
    console.print(f"chosen recipe: {out}/mixed.yaml", markup=False)


@main.command()
@click.option(
    "--recipe", "recipes", multiple=True, required=True, metavar="RECIPE", help="a recipe file or built-in name (repeat)"
)
@click.option(
    "--model",
    "models",
    multiple=True,
    metavar="SOURCE",
    help="run each recipe on this model too (repeat; default: each recipe's own)",
)
@click.option(
    "--target", "targets", multiple=True, metavar="TARGET", help="measure on this target (repeat; default: each recipe's targets)"
)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a recipe key in every cell")
@click.option(
    "--out", required=True, type=click.Path(path_type=Path), help="a new folder for runs/, sweep.md, sweep.json, junit.xml"
)
@click.option("--address", metavar="HOST:PORT", help="a Ray cluster to run the cells on (default: RAY_ADDRESS, else a local Ray)")
@click.option(
    "--parallel", type=click.IntRange(1), help="cells at once (default: one per node when timing, one per CPU otherwise)"
)
@guarded("the cells that finished are in the sweep's report; the others are marked not run.")
def sweep(
    recipes: tuple[str, ...],
    models: tuple[str, ...],
    targets: tuple[str, ...],
    overrides: tuple[str, ...],
    out: Path,
    address: str | None,
    parallel: int | None,
) -> None:
    """Run recipes x models x targets as Ray tasks (a CI matrix): one aggregated report and one JUnit
    file. Exit 0 if every cell met its budgets, 1 if a budget failed, 2 if a cell could not run."""
    from slimline.search.sweep import plan
    from slimline.search.sweep import sweep as run_sweep

    cells = plan(list(recipes), list(models), list(targets), list(overrides))

    def say(message: str) -> None:
        console.print(message, markup=False, highlight=False, soft_wrap=True)

    result = run_sweep(cells, out, address=address, parallel=parallel, log=say)
    click.echo((out / "sweep.md").read_text())
    states = [c["state"] for c in result["cells"]]
    sys.exit(2 if "error" in states else 1 if "failed" in states else 0)


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="folder for compare.{md,json,png,html}")
@guarded("no comparison was written.")
def compare(run_dirs: tuple[Path, ...], out: Path) -> None:
    """Put several runs side by side, with the Pareto frontier (speedup x mean cosine) marked."""
    from slimline.evaluate.compare import write_comparison

    write_comparison(list(run_dirs), out)
    click.echo((out / "compare.md").read_text())
    console.print(f"written: {out}/compare.md, compare.json, compare.png, compare.html", markup=False)


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--prompt",
    "prompts",
    required=True,
    multiple=True,
    help="the text to continue; give it several times for one batch of prompts (of any lengths)",
)
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--sample", is_flag=True, help="sample instead of greedy decoding")
@click.option("--temperature", default=0.8, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--top-k", default=50, show_default=True, type=click.IntRange(0))
@click.option("--top-p", default=0.95, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--chat", is_flag=True, help="wrap the prompt in the tokenizer's chat template")
@click.option(
    "--prompt-lookup",
    default=0,
    show_default=True,
    type=click.IntRange(0, 64),
    help="exact greedy speculative decoding: up to N draft tokens per run, copied from earlier text (greedy, one prompt)",
)
@click.option("--threads", default=0, type=click.IntRange(0), help="ONNX Runtime threads (0: all cores)")
@guarded("generation stopped.")
def generate(
    run_dir: Path,
    prompts: tuple[str, ...],
    max_new_tokens: int,
    sample: bool,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int,
    chat: bool,
    prompt_lookup: int,
    threads: int,
) -> None:
    """Generate text with RUN_DIR's ONNX decoder and its KV cache, streaming tokens as they come."""
    import time

    import numpy as np

    from slimline.generate import GenerationError, OnnxDecoder, Sampling, eos_ids

    path = run_dir / "model.onnx"
    if not path.is_file():
        raise GenerationError(
            f"{run_dir}: no model.onnx. Give the folder of a finished `slimline run` of a text-generation recipe."
        )
    from transformers import AutoConfig, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(run_dir)
        config = AutoConfig.from_pretrained(run_dir)
    except (OSError, ValueError) as e:
        raise GenerationError(f"{run_dir}: no tokenizer/config beside model.onnx ({str(e).splitlines()[0][:200]}).") from None
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        if chat and tokenizer.chat_template
        else p
        for p in prompts
    ]
    rows = [tokenizer(t, add_special_tokens=not chat)["input_ids"] for t in texts]
    lengths = [len(r) for r in rows]
    ids = np.array([r + [rows[0][0]] * (max(lengths) - len(r)) for r in rows], np.int64)  # right-padded
    context = getattr(config, "max_position_embeddings", None)
    if context and ids.shape[1] + max_new_tokens > context:
        raise GenerationError(
            f"the prompt has {ids.shape[1]} tokens; with --max-new-tokens {max_new_tokens} that exceeds the model's "
            f"context of {context}. Shorten the prompt or lower --max-new-tokens."
        )
    decoder = OnnxDecoder(path, threads, max_context=context)
    sampling = Sampling(max_new_tokens, sample, temperature, top_k, top_p, seed, eos_ids(tokenizer, config), prompt_lookup)
    if len(rows) > 1:  # a batch: no streaming; each continuation printed when all are done
        t0 = time.perf_counter()
        out = decoder.generate(ids, sampling, lengths=lengths)
        wall = time.perf_counter() - t0
        for i, row in enumerate(out):
            kept = [int(t) for t in row if int(t) not in sampling.eos_ids]
            click.echo(f"[{i}] {prompts[i]}{tokenizer.decode(kept, skip_special_tokens=True)}")
        console.print(f"[dim]{out.size} tokens in {wall:.2f}s ({out.size / wall:.1f} tokens/s, {len(rows)} prompts)[/dim]")
        return
    emitted: list[int] = []
    shown = ""

    def stream(token) -> None:  # noqa: ANN001
        nonlocal shown
        if int(token[0]) in sampling.eos_ids:
            return
        emitted.append(int(token[0]))
        text = tokenizer.decode(emitted, skip_special_tokens=True)
        click.echo(text[len(shown) :], nl=False)
        shown = text

    if prompt_lookup and not decoder.exact_multi_token:
        err_console.print(
            "[yellow]--prompt-lookup: this model's int4 kernels (accuracy_level 4) quantize activations only in multi-token "
            "runs, so the text can differ from plain greedy decoding's.[/yellow]"
        )
    t0 = time.perf_counter()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # said above, in the CLI's words
        out = decoder.generate(ids, sampling, stream)
    wall = time.perf_counter() - t0
    click.echo("")
    if prompt_lookup:
        s = decoder.lookup_stats
        console.print(f"[dim]prompt lookup: {s['accepted']} of {s['drafted']} drafted tokens kept, {s['runs']} runs[/dim]")
    console.print(
        f"[dim]{out.shape[1]} tokens in {wall:.2f}s ({out.shape[1] / wall:.1f} tokens/s, prompt {ids.shape[1]} tokens)[/dim]"
    )


@main.group(name="ops")
def ops_group() -> None:
    """slimline's own ONNX Runtime custom ops (ai.slimline): build and show them."""


@ops_group.command(name="build")
@click.option("--no-cuda", is_flag=True, help="CPU kernels only, even where nvcc is found")
@click.option("--force", is_flag=True, help="compile again even if this source tree's build exists")
def ops_build(no_cuda: bool, force: bool) -> None:
    """Compile the custom-op library (C++; CUDA kernels where nvcc is found). Exit 2 if nothing could be built."""
    from slimline.ops.build import build

    built = build(cuda=not no_cuda, force=force, say=lambda m: err_console.print(f"[dim]{m}[/dim]"))
    for note in built.notes:
        err_console.print(f"[yellow]{note}[/yellow]")
    if built.cpu is None:
        _say_error("no custom-op library was built (the reason is above); models that use ai.slimline ops won't load.")
    console.print(f"CPU kernels: {built.cpu}")
    console.print(f"CUDA kernels: {built.cuda or 'not built'}")


@ops_group.command(name="info")
def ops_info() -> None:
    """Where the library is, what it holds, and why not if it isn't built."""
    from slimline import ops

    console.print(f"domain {ops.DOMAIN}: {', '.join(ops.OPS)}")
    console.print(f"CPU kernels: {ops.library() or 'not built: ' + ops.why_unavailable()}")
    if ops.library():
        console.print(f"MatMulQ4/Q8 CPU kernel on this machine: {ops.matmul_q4_kernel()}")
    cuda = ops.library(cuda=True)
    console.print(f"CUDA kernels: {cuda if cuda and cuda.name.endswith('_cuda.so') else 'not built'}")


if __name__ == "__main__":
    main()
