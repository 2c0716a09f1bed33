"""Bad input, as a careless user or a hostile CI input gives it: every case ends with one plain
paragraph and exit 2 (130 for interrupts), no traceback, and no file outside the run's own folder
touched. The recipes live in tests/data/bad/recipes (each names the message it expects); data files,
model folders, reports, manifests, output folders, signals and a full disk are built here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from slimline.cli import main
from tests.models import terminate_when_started, tiny_recipe

CORPUS = Path(__file__).parent / "data" / "bad" / "recipes"


def invoke(*args, cwd: Path | None = None):
    old = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        r = CliRunner().invoke(main, [str(a) for a in args])
    finally:
        os.chdir(old)
    return r.exit_code, r.output


def assert_clean_error(code, out, *needles, exit_code=2):
    assert code == exit_code, out
    assert "Traceback" not in out, out
    flat = " ".join(out.split())
    for needle in needles:
        assert needle in flat, out


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under ``root`` with its size, mtime and mode: what 'nothing changed' compares."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_size if not p.is_dir() else 0, st.st_mtime_ns if not p.is_dir() else 0, st.st_mode)
    return out


def scratch_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).iterdir() if p.name.startswith("slimline-")}


def write_recipe(folder: Path, data: dict, name: str = "r.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(data))
    return path


# -- recipes -------------------------------------------------------------------------------------------


def corpus_cases():
    for path in sorted(CORPUS.glob("*.yaml")):
        head = path.read_bytes().decode("utf-8", errors="replace").splitlines()
        expect = head[0].split("expect:", 1)[1].strip() if head and "expect:" in head[0] else ""
        run = any(line.strip() == "# run: true" for line in head[:3])
        yield pytest.param(path, expect, run, id=path.stem)


@pytest.mark.parametrize("path,expect,run", list(corpus_cases()))
def test_bad_recipe_is_a_clean_error_and_writes_nothing(path, expect, run, tiny_bert_dir, tmp_path):
    text = path.read_bytes().replace(b"MODEL", str(tiny_bert_dir).encode())
    recipe = tmp_path / path.name
    recipe.write_bytes(text)
    before, scratch = snapshot(tmp_path), scratch_dirs()
    code, out = invoke("validate", recipe, cwd=tmp_path) if not run else (None, None)
    if not run:
        assert_clean_error(code, out, expect)
        assert len(out) < 2500, f"the message echoes its input: {len(out)} characters"
    code, out = invoke("run", recipe, "--out", tmp_path / "run", cwd=tmp_path)
    assert_clean_error(code, out, expect)
    assert snapshot(tmp_path) == before and scratch_dirs() <= scratch


def test_recipe_path_with_markup_is_printed_as_written(tmp_path):
    code, out = invoke("run", tmp_path / "missing[/x].yaml")
    assert_clean_error(code, out, "missing[/x].yaml: recipe file not found")


def test_model_path_with_brackets_is_printed_as_written(tmp_path):
    code, out = invoke("run", write_recipe(tmp_path, tiny_recipe(tmp_path / "tiny[ft-v2]")), "--out", tmp_path / "run")
    assert_clean_error(code, out, "model.source `" + str(tmp_path / "tiny[ft-v2]") + "`: no such file or folder")


def test_a_missing_local_path_is_never_taken_as_a_hub_id(tmp_path):
    code, out = invoke("run", write_recipe(tmp_path, tiny_recipe("models/my-finetune")), "--out", tmp_path / "run", cwd=tmp_path)
    assert_clean_error(code, out, "no such file or folder", "hf:models/my-finetune@<revision>")


def test_a_bad_override_value_is_bounded(tmp_path):
    code, out = invoke("validate", "minilm-int8", "--set", "evaluate.speed.repeats=" + "9" * 5000)
    assert_clean_error(code, out, "evaluate.speed.repeats")
    assert len(out) < 2500


# -- data files ----------------------------------------------------------------------------------------

DATA_CASES = {
    "jsonl-string-row": (
        "rows.jsonl",
        '{"text": "a good line of verse"}\n"just a string"\n',
        {},
        "rows.jsonl:2: a JSONL row must be an object",
    ),
    "jsonl-number-row": (
        "rows.jsonl",
        '{"text": "a good line of verse"}\n42\n',
        {},
        "rows.jsonl:2: a JSONL row must be an object",
    ),
    "jsonl-later-row-lacks-text": (
        "rows.jsonl",
        '{"text": "one fine line"}\n{"text": "two fine lines"}\n{"body": "no text here"}\n',
        {},
        "rows.jsonl:3: the row has no `text`",
    ),
    "jsonl-text-not-a-string": ("rows.jsonl", '{"text": "fine"}\n{"text": 12}\n', {}, "rows.jsonl:2: `text` must be text"),
    "jsonl-nested-too-deep": ("rows.jsonl", "[" * 100000 + "]" * 100000 + "\n", {}, "not valid JSON"),
    "csv-score-not-a-number": (
        "pairs.csv",
        "a,b,score\nthe king,the queen,3.5\nlove,death,lots\n",
        {"text_column": "a", "pair_column": "b", "score_column": "score"},
        "pairs.csv:3: score `lots` in `score` is not a finite number",
    ),
    "csv-score-nan": (
        "pairs.csv",
        "a,b,score\nthe king,the queen,nan\n",
        {"text_column": "a", "pair_column": "b", "score_column": "score"},
        "is not a finite number",
    ),
    "csv-short-row": ("pairs.csv", "a,b\nthe king,the queen\nlonely\n", {"text_column": "b"}, "pairs.csv:3: the row has no `b`"),
    "txt-not-utf8": ("lines.txt", b"\xff\xfe\x00bad", {}, "lines.txt: not UTF-8 text"),
    "empty-file": ("lines.txt", "", {}, "holds no rows"),
    "missing-file": (None, None, {}, "does not exist"),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data_fails_before_compute(case, tiny_bert_dir, tmp_path):
    name, content, columns, expect = DATA_CASES[case]
    data_path = tmp_path / (name or "absent.jsonl")
    if content is not None:
        data_path.write_bytes(content if isinstance(content, bytes) else content.encode())
    data = tiny_recipe(tiny_bert_dir, speed={"enabled": False})
    data["evaluate"]["data"] = {"source": str(data_path), **columns}
    recipe = write_recipe(tmp_path, data)
    before, scratch = snapshot(tmp_path), scratch_dirs()
    started = time.perf_counter()
    code, out = invoke("run", recipe, "--out", tmp_path / "run")
    assert_clean_error(code, out, expect)
    assert "export" not in out.lower() or "compile.export done" not in out  # failed before any stage ran
    assert snapshot(tmp_path) == before and scratch_dirs() <= scratch
    assert time.perf_counter() - started < 60


def test_classifier_labels_must_be_the_models(tiny_classifier_dir, tmp_path):
    (tmp_path / "labelled.csv").write_text("text,label\nthe king is dead,LABEL_1\nlong live the king,banana\n")
    data = tiny_recipe(tiny_classifier_dir, speed={"enabled": False})
    data["model"]["task"] = "text-classification"
    data["stages"] = [{"compile.export": {}}]
    data["evaluate"]["data"] = {"source": str(tmp_path / "labelled.csv"), "label_column": "label"}
    code, out = invoke("run", write_recipe(tmp_path, data), "--out", tmp_path / "run")
    assert_clean_error(code, out, "label `banana` is not one of the model's labels (LABEL_0, LABEL_1, LABEL_2)")
    assert not (tmp_path / "run").exists()


# -- model folders -------------------------------------------------------------------------------------


def test_corrupt_pooling_config(tiny_bert_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, model)
    (model / "1_Pooling").mkdir()
    (model / "1_Pooling" / "config.json").write_text("{not json")
    code, out = invoke("run", write_recipe(tmp_path, tiny_recipe(model)), "--out", tmp_path / "run")
    assert_clean_error(code, out, "1_Pooling/config.json: not valid JSON", "model.pooling")


@pytest.mark.parametrize("damage", ["config", "weights", "tokenizer"])
def test_damaged_model_folder(damage, tiny_bert_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, model)
    target = {"config": "config.json", "weights": "model.safetensors", "tokenizer": "tokenizer.json"}[damage]
    (model / target).write_bytes(b"\x00garbage")
    code, out = invoke("run", write_recipe(tmp_path, tiny_recipe(model)), "--out", tmp_path / "run")
    # a damaged config.json is named before anything loads; damaged weights or tokenizer when they load
    assert_clean_error(code, out, "config.json: not readable JSON" if damage == "config" else "model.source")
    assert not (tmp_path / "run").exists()


# -- reports and manifests -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_run(tiny_bert_dir, tmp_path_factory) -> Path:
    from slimline import recipe as R
    from slimline.pipeline import run_recipe

    out = tmp_path_factory.mktemp("good") / "run"
    run_recipe(R.from_dict(tiny_recipe(tiny_bert_dir, speed={"enabled": False}, budgets={"max_fidelity_drop": 0.5})), out)
    return out


REPORT_DAMAGE = {
    "not-json": lambda r: "{oops",
    "array": lambda r: "[1, 2, 3]",
    "empty-object": lambda r: "{}",
    "budgets-not-a-list": lambda r: json.dumps({**r, "budgets": "all good"}),
    "speedup-a-string": lambda r: json.dumps({**r, "summary": {"ort-cpu": {**r["summary"]["ort-cpu"], "speedup": "fast"}}}),
    "budget-spec-damaged": lambda r: json.dumps({**r, "budget_spec": {"min_speedup": "very"}}),
    "latency-keys-garbage": lambda r: json.dumps(
        {**r, "summary": {"ort-cpu": {**r["summary"]["ort-cpu"], "latency_ms_p95": {"x": "y"}}}}
    ),
    "wrong-schema": lambda r: json.dumps({**r, "schema_version": 99}),
    "deeply-nested": lambda r: "[" * 100000 + "]" * 100000,
}


@pytest.mark.parametrize("damage", list(REPORT_DAMAGE))
@pytest.mark.parametrize("command", ["check", "inspect", "compare"])
def test_damaged_report_is_a_clean_error(damage, command, good_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    report = json.loads((run / "report.json").read_text())
    (run / "report.json").write_text(REPORT_DAMAGE[damage](report))
    args = {"check": ("check", run), "inspect": ("inspect", run), "compare": ("compare", run, "--out", tmp_path / "cmp")}[command]
    code, out = invoke(*args)
    assert_clean_error(code, out, "report")
    assert not (tmp_path / "cmp").exists()


@pytest.mark.parametrize("content", ["{oops", "[]", '{"slimline_manifest": 1, "recipe": 3}', '{"slimline_manifest": 1}'])
def test_damaged_manifest_is_a_clean_error(content, good_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    (run / "manifest.json").write_text(content)
    before = snapshot(run)
    for args in (("inspect", run), ("evaluate", run)):
        code, out = invoke(*args)
        assert_clean_error(code, out, "manifest")
    assert snapshot(run) == before


def test_junit_path_that_is_not_ours_is_not_overwritten(good_run, tmp_path):
    precious = tmp_path / "notes.xml"
    precious.write_text("<mine/>")
    code, out = invoke("check", good_run, "--junit", precious)
    assert_clean_error(code, out, "not a JUnit file slimline wrote")
    assert precious.read_text() == "<mine/>"


def test_unknown_required_target(good_run):
    assert_clean_error(*invoke("check", good_run, "--require", "ort-cdua"), "Did you mean `ort-cuda`?")


def test_budget_override_cannot_remove_a_budget(good_run):
    assert_clean_error(*invoke("check", good_run, "--budget", "max_fidelity_drop=null"), "only add or tighten")


# -- output folders ------------------------------------------------------------------------------------


def _fake_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("secret")
    (home / "project.txt").write_text("work")
    return home


def test_force_never_replaces_the_home_folder(tiny_bert_dir, tmp_path, monkeypatch):
    home = _fake_home(tmp_path)
    monkeypatch.setenv("HOME", str(home))
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_bert_dir, speed={"enabled": False}))
    before = snapshot(tmp_path)
    code, out = invoke("run", recipe, "--out", home, "--force")
    assert_clean_error(code, out, "home folder")
    assert snapshot(tmp_path) == before


def test_force_never_replaces_the_working_directory_or_its_parent(tiny_bert_dir, tmp_path):
    work = tmp_path / "checkout"
    (work / ".git").mkdir(parents=True)
    (work / ".git" / "HEAD").write_text("ref: refs/heads/main")
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_bert_dir, speed={"enabled": False}))
    before = snapshot(tmp_path)
    for out in (".", work, tmp_path):
        code, text = invoke("run", recipe, "--out", out, "--force", cwd=work)
        assert_clean_error(code, text, "working directory")
    assert snapshot(tmp_path) == before


def test_force_refuses_a_folder_slimline_did_not_write(tiny_bert_dir, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"\xff\xd8")
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_bert_dir, speed={"enabled": False}))
    before = snapshot(tmp_path)
    assert_clean_error(*invoke("run", recipe, "--out", folder, "--force"), "no slimline manifest")
    # a manifest alone does not make it ours either: the other files are not in its outputs
    (folder / "manifest.json").write_text('{"slimline_manifest": 1, "outputs": {}}')
    assert_clean_error(*invoke("run", recipe, "--out", folder, "--force"), "did not write (cat.jpg)")
    assert (folder / "cat.jpg").read_bytes() == b"\xff\xd8"
    del before


@pytest.mark.parametrize("out", ["/proc/slimline-x", "/proc/self/status", "/dev/null"])
def test_unwritable_or_special_out(tiny_bert_dir, tmp_path, out):
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_bert_dir, speed={"enabled": False}))
    code, text = invoke("run", recipe, "--out", out)
    assert_clean_error(code, text, "--out")


def test_out_is_a_symlink(tiny_bert_dir, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_bert_dir, speed={"enabled": False}))
    assert_clean_error(*invoke("run", recipe, "--out", tmp_path / "link", "--force"), "symbolic link")


def test_a_folder_that_appears_during_the_run_is_kept(tiny_bert_dir, tmp_path, monkeypatch):
    """Two runs to one --out: the second to finish never replaces the first, it goes beside it."""
    from slimline.compile.export import Export

    out = tmp_path / "run"
    real_run = Export.run

    def racing(self, artifact, ctx):
        result = real_run(self, artifact, ctx)
        out.mkdir()
        (out / "theirs.txt").write_text("another run's file")
        return result

    monkeypatch.setattr(Export, "run", racing)
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_bert_dir, speed={"enabled": False}))
    code, text = invoke("run", recipe, "--out", out)
    assert_clean_error(code, text, "something else was written there", str(tmp_path / "run-2"))
    assert (out / "theirs.txt").read_text() == "another run's file"
    assert (tmp_path / "run-2" / "model.onnx").exists() and (tmp_path / "run-2" / "manifest.json").exists()


def test_force_does_not_replace_a_run_finished_during_this_one(tiny_bert_dir, tmp_path, monkeypatch):
    """--force agreed to replace the run that was there when it started, not one that finished since."""
    from slimline import recipe as R
    from slimline.compile.export import Export
    from slimline.pipeline import run_recipe

    out = tmp_path / "run"
    data = tiny_recipe(tiny_bert_dir, speed={"enabled": False})
    run_recipe(R.from_dict(data), out)
    real_run = Export.run
    theirs: dict[str, str] = {}

    def racing(self, artifact, ctx):
        result = real_run(self, artifact, ctx)
        monkeypatch.setattr(Export, "run", real_run)
        run_recipe(R.from_dict(data), out, force=True)  # another forced run finishes first
        theirs["id"] = json.loads((out / "manifest.json").read_text())["run_id"]
        return result

    monkeypatch.setattr(Export, "run", racing)
    code, text = invoke("run", write_recipe(tmp_path, data), "--out", out, "--force")
    assert_clean_error(code, text, "something else was written there")
    assert json.loads((out / "manifest.json").read_text())["run_id"] == theirs["id"]
    assert (tmp_path / "run-2" / "manifest.json").exists()


def test_run_folder_follows_the_umask(tiny_bert_dir, tmp_path):
    from slimline import recipe as R
    from slimline.pipeline import run_recipe

    old = os.umask(0o027)
    try:
        run_recipe(R.from_dict(tiny_recipe(tiny_bert_dir, speed={"enabled": False})), tmp_path / "run")
    finally:
        os.umask(old)
    assert (tmp_path / "run").stat().st_mode & 0o777 == 0o750


def _dead_owner(folder: Path) -> None:
    """Write an owner file for a process that has exited (a real one, so its pid was used)."""
    code = "import json,os,sys; from slimline.runfolder import owner_record; print(json.dumps(owner_record()))"
    record = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    (folder / ".slimline-owner.json").write_text(record)


def test_stale_folders_of_dead_runs_are_cleaned_and_others_kept(tiny_bert_dir, tmp_path):
    from slimline import recipe as R
    from slimline.pipeline import run_recipe

    dead_partial = tmp_path / ".old-run.partial-abc"
    dead_scratch = Path(tempfile.mkdtemp(prefix="slimline-"))
    not_ours = tmp_path / ".mine.partial-xyz"  # no owner file: never touched
    for folder in (dead_partial, not_ours):
        folder.mkdir()
        (folder / "x").write_text("x")
    _dead_owner(dead_partial)
    _dead_owner(dead_scratch)
    # a set-aside run whose replacement never arrived is restored, not deleted
    aside = tmp_path / ".keep.old-12345"
    aside.mkdir()
    (aside / "manifest.json").write_text('{"slimline_manifest": 1, "outputs": {}}')
    _dead_owner(aside)
    run_recipe(R.from_dict(tiny_recipe(tiny_bert_dir, speed={"enabled": False})), tmp_path / "run")
    assert not dead_partial.exists() and not dead_scratch.exists()
    assert (not_ours / "x").exists()
    assert (tmp_path / "keep" / "manifest.json").exists() and not aside.exists()


# -- a full disk -----------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs, where the machine lets this user mount one (root on Linux); skipped otherwise."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"can't mount a tmpfs here: {done.stderr.strip()[:200]}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_too_little_disk_is_refused_before_compute(tiny_bert_dir, tmp_path, small_disk):
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_bert_dir, speed={"enabled": False}))
    code, out = invoke("run", recipe, "--out", small_disk / "run")
    assert_clean_error(code, out, "not enough disk space", "MB are free")
    assert list(small_disk.iterdir()) == []


def test_a_disk_that_fills_up_mid_run_leaves_nothing(tiny_bert_dir, tmp_path, small_disk, monkeypatch):
    import slimline.preflight

    monkeypatch.setattr(slimline.preflight, "check_disk", lambda *a, **k: {})  # let the run start, then fill the disk
    (small_disk / "filler").write_bytes(b"\0" * (2048 * 1024 - 8192))
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_bert_dir, speed={"enabled": False}))
    code, out = invoke("run", recipe, "--out", small_disk / "run")
    assert_clean_error(code, out, "no space left on the device")
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


# -- signals -----------------------------------------------------------------------------------------------


def test_interrupted_evaluate_exits_130_and_leaves_the_folder_as_it_was(good_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    before, scratch = snapshot(run), scratch_dirs()
    settings = [
        "evaluate.speed.enabled=true",
        "evaluate.speed.repeats=10000",
        "evaluate.speed.batch_sizes=[4]",
        "evaluate.speed.seq_len=16",
    ]
    args = ["evaluate", str(run), *(x for s in settings for x in ("--set", s))]
    code, err = terminate_when_started(args, run, ".evaluate.partial-")
    assert code == 130, err
    assert "Traceback" not in err and "left as it was" in err
    assert snapshot(run) == before and scratch_dirs() <= scratch


# -- hub sources -----------------------------------------------------------------------------------------


@pytest.fixture
def fake_hub(tiny_bert_dir, tmp_path, monkeypatch):
    """huggingface_hub's cache layout with one repository, used offline: no network in tests."""
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-bert"
    shutil.copytree(tiny_bert_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return commit


def test_hub_source_is_pinned_and_hashed_in_the_manifest(fake_hub, tmp_path):
    from slimline import recipe as R
    from slimline.pipeline import run_recipe
    from slimline.stage import Reporter

    data = tiny_recipe(f"hf:acme/tiny-bert@{fake_hub}", speed={"enabled": False})
    run_recipe(R.from_dict(data), tmp_path / "pinned")
    inputs = json.loads((tmp_path / "pinned" / "manifest.json").read_text())["inputs"]
    assert inputs["hub_repo"] == "acme/tiny-bert" and inputs["hub_commit"] == fake_hub
    assert len(inputs["files"]["model.safetensors"]) == 64  # sha256 of each file
    reporter = Reporter()
    run_recipe(R.from_dict(tiny_recipe("hf:acme/tiny-bert", speed={"enabled": False})), tmp_path / "unpinned", reporter=reporter)
    assert any(f"hf:acme/tiny-bert@{fake_hub}" in w and "not pinned" in w for w in reporter.warnings)


def test_hub_repository_that_is_not_there(fake_hub, tmp_path):
    recipe = write_recipe(tmp_path, tiny_recipe("hf:acme/absent@main", speed={"enabled": False}))
    code, out = invoke("run", recipe, "--out", tmp_path / "run")
    assert_clean_error(code, out, "model.source `hf:acme/absent@main`")
    assert not (tmp_path / "run").exists()


def test_a_recipe_that_is_a_pipe_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "r.yaml")
    assert_clean_error(*invoke("validate", tmp_path / "r.yaml"), "not a regular file")


def test_data_that_is_a_device_is_refused(tiny_bert_dir, tmp_path):
    data = tiny_recipe(tiny_bert_dir, speed={"enabled": False})
    data["evaluate"]["data"] = {"source": "/dev/zero"}
    code, out = invoke("run", write_recipe(tmp_path, data), "--out", tmp_path / "run")
    assert_clean_error(code, out, "/dev/zero is not a regular file")


def test_evaluate_on_a_damaged_artifact(good_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    (run / "model.onnx").write_bytes(b"garbage")
    before = snapshot(run)
    assert_clean_error(*invoke("evaluate", run), "model.onnx: not a readable ONNX model")
    assert snapshot(run) == before


def test_a_csv_with_a_byte_order_mark_reads_its_first_column(tiny_bert_dir, tmp_path):
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbftext\n" + b"".join(f"line {i} of the verse\n".encode() for i in range(20)))
    data = tiny_recipe(tiny_bert_dir, speed={"enabled": False})
    data["evaluate"]["data"] = {"source": str(tmp_path / "bom.csv")}
    code, out = invoke("run", write_recipe(tmp_path, data), "--out", tmp_path / "run")
    assert code == 0, out
