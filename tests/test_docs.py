"""The README and docs/ stay true: every README command runs, every documented Python command
parses, every relative link resolves, and the scoring page lists exactly the job's flags.

README commands run as written. The default suite stands the session's tiny model (made by
``model.train``'s own code, tests/conftest.py) where the README's training commands would write
theirs, after parsing those commands with ``model.train``'s parser: training for real takes
minutes and ImageNet weights from the internet. The ``slow`` variants train too, the README's
command with ``TRAIN_OFFLINE`` appended (argparse keeps the last value of a flag).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import hashlib
import importlib
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys

import pytest

from model.synthetic import write_kaggle_test_folder, write_labelled_folders
from tests.pipeline.outputs import read_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
DOCS = os.path.join(REPO, "docs")
README_MAX_LINES = 250
# Pages the README links to that other open branches add; absent here until they are merged.
PAGES_OF_OPEN_BRANCHES: dict[str, str] = {}
# What the README's training command gets appended in the slow tests: no ImageNet download, a
# tiny base at 32 px, one epoch.
TRAIN_OFFLINE = ["--base", "mobilenet", "--alpha", "0.25", "--base-weights", "none", "--input-size", "32",
                 "--epochs", "1", "--batch-size", "16"]
PYTHONS = (".venv/bin/python", "python", "python3")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^```(\S*)\s*$")


# --- reading Markdown ----------------------------------------------------------------------------

@dataclasses.dataclass
class CodeBlock:
    language: str
    section: str  # the nearest heading above the block
    lines: list[str] = dataclasses.field(default_factory=list)


def read_text(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def split_page(path: str) -> tuple[list[str], list[CodeBlock]]:
    """A Markdown page's prose lines (those outside fenced code blocks) and its code blocks."""
    prose_lines, blocks, section, block = [], [], "", None
    for line in read_text(path).splitlines():
        if block is not None:
            if line.strip() == "```":
                blocks.append(block)
                block = None
            else:
                block.lines.append(line)
        elif fence := FENCE.match(line):
            block = CodeBlock(fence.group(1), section)
        else:
            prose_lines.append(line)
            if heading := HEADING.match(line):
                section = heading.group(1)
    assert block is None, f"{path}: a code block under {block.section!r} is never closed"
    return prose_lines, blocks


def code_blocks(path: str) -> list[CodeBlock]:
    return split_page(path)[1]


def prose(path: str) -> list[str]:
    """The page's prose, inline code removed: where links can be."""
    return [re.sub(r"`[^`]*`", "", line) for line in split_page(path)[0]]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: str) -> set[str]:
    """Every heading's anchor; a repeated heading gets -1, -2, ... as on GitHub."""
    found, seen = set(), {}
    for line in split_page(path)[0]:
        if heading := HEADING.match(line):
            base = slug(heading.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def commands(block: str) -> list[str]:
    """A bash block's commands: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [" ".join(shlex.split(line, comments=True, posix=False)) for line in joined.splitlines()
            if shlex.split(line, comments=True)]


def readme_commands(section: str) -> list[str]:
    blocks = [block for block in code_blocks(README) if block.language == "bash" and block.section == section]
    assert len(blocks) == 1, f"README: expected one bash block under {section!r}, found {len(blocks)}"
    return commands("\n".join(blocks[0].lines))


def doc_pages() -> list[str]:
    return sorted(glob.glob(os.path.join(DOCS, "*.md")))


# --- the README's commands -----------------------------------------------------------------------

# README section -> the test that runs its commands
README_SECTIONS = {
    "petscore": "test_readme_demo_and_test_commands_run",
    "Score the Kaggle test set": "test_readme_kaggle_commands_run",
    "Bring the model from your notebook": "test_readme_notebook_commands_run",
    "Change the model without fear": "test_readme_change_model_commands_run",
    "Run nightly on Dataflow": "test_readme_nightly_commands_run_against_a_recording_gcloud",
}


def test_every_readme_command_block_is_run_by_a_test():
    blocks = code_blocks(README)
    assert {block.language for block in blocks} <= {"bash", "text"}, \
        "README code blocks are tagged bash (commands, run by this file) or text (anything else)"
    sections = [block.section for block in blocks if block.language == "bash"]
    assert sorted(sections) == sorted(README_SECTIONS), \
        "a README bash block without a test that runs it, or a test whose README block is gone"
    assert all(callable(globals().get(name)) for name in README_SECTIONS.values())


def test_the_readme_stays_short():
    with open(README, encoding="utf-8") as handle:
        assert sum(1 for _ in handle) <= README_MAX_LINES, "move detail into a docs/ page"


def run_python_command(command: str, stand_in_model: str | None) -> None:
    """Run a README ``.venv/bin/python -m MODULE ...`` command in-process (what ``python -m``
    runs is the module's ``main``). ``model.train`` is parsed, then either run with
    ``TRAIN_OFFLINE`` appended (``stand_in_model`` None) or stood in for by that model."""
    tokens = shlex.split(command)
    assert tokens[:2] == [".venv/bin/python", "-m"], f"not a python -m command: {command}"
    module, args = tokens[2], tokens[3:]
    if module == "model.train":
        from model.train import main, parse_args

        output = parse_args(args).output
        if stand_in_model:
            shutil.copytree(stand_in_model, output)
        else:
            assert main(args + TRAIN_OFFLINE) == 0, command
        return
    assert importlib.import_module(module).main(args) == 0, command


def venv_is_set_up() -> bool:
    """True when scripts/setup.sh would install nothing (its stamp matches): the scripts the
    README shows call it, and a test must not install packages."""
    digest = hashlib.sha256()
    for name in ("requirements.txt", "requirements-dev.txt", "requirements-jax.txt", "constraints.txt",
                 "setup.py"):
        with open(os.path.join(REPO, name), "rb") as handle:
            digest.update(handle.read())
    wanted = digest.hexdigest()
    stamp = os.path.join(REPO, ".venv", ".petscore-installed")
    return os.path.exists(stamp) and read_text(stamp).strip() == wanted


TRAINING = [pytest.param(False, id="stand-in-model"),
            pytest.param(True, id="training", marks=pytest.mark.slow)]


@pytest.mark.parametrize("train", TRAINING)
def test_readme_demo_and_test_commands_run(train, trained, tmp_path):
    """``scripts/demo.sh`` end to end into a scratch DEMO_OUTPUT; ``scripts/test.sh`` as CI runs
    it, collecting only (the suite cannot run itself), so it must select the default suite."""
    if not venv_is_set_up():
        pytest.skip(".venv is not as scripts/setup.sh leaves it: the scripts would install packages")
    block = readme_commands("petscore")
    assert block == ["scripts/demo.sh", "scripts/test.sh"]
    with open(os.path.join(REPO, ".ci", "run")) as handle:
        ci = handle.read().splitlines()
    assert "scripts/test.sh" in ci, "CI runs the README's test command"
    assert "exec scripts/test_portable.sh" in ci, "and then the portable-runner suite"
    out = tmp_path / "demo"
    if not train:
        shutil.copytree(trained["model_dir"], out / "model")
    env = {**os.environ, "DEMO_OUTPUT": str(out),
           "PYTEST_ADDOPTS": f"--collect-only -q {os.path.relpath(__file__, REPO)}"}
    process = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(block)], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=900)
    assert process.returncode == 0, process.stderr[-3000:]
    run = read_run(str(out / "run"))
    summary = run["summary"]
    assert (summary["inputs"], summary["predictions"], summary["errors"]) == (202, 200, 2)
    assert summary["errors_by_type"] == {"EmptyImageError": 1, "UnidentifiedImageError": 1}
    assert run["csv"][0] == ["id", "label"] and [row[0] for row in run["csv"][1:4]] == ["1", "2", "3"]
    assert f"first rows of {out}/run/submission.csv:\nid,label\n1," in process.stdout
    assert "test_readme_kaggle_commands_run[stand-in-model]" in process.stdout
    assert "test_readme_kaggle_commands_run[training]" not in process.stdout  # -m "not slow"
    assert "deselected" in process.stdout


@pytest.mark.parametrize("train", TRAINING)
def test_readme_kaggle_commands_run(train, trained, labelled_images, tmp_path, monkeypatch):
    """Kaggle's layout: data/train/cat.1.jpg names, data/test/<id>.jpg; the submission read back."""
    from model.data import find_labelled_images

    monkeypatch.chdir(tmp_path)
    os.makedirs("data/train")
    for path in glob.glob(os.path.join(labelled_images, "*", "*.jpg")):
        os.symlink(path, os.path.join("data/train", os.path.basename(path)))
    assert find_labelled_images("data/train").class_names == ["cat", "dog"]
    write_kaggle_test_folder("data/test", 12, seed=3, side_range=(40, 72))
    for command in readme_commands("Score the Kaggle test set"):
        run_python_command(command, stand_in_model=None if train else trained["model_dir"])
    run = read_run("out/kaggle")
    assert run["summary"]["accounted"] and run["summary"]["predictions"] == 12
    assert run["csv"][0] == ["id", "label"]
    assert [row[0] for row in run["csv"][1:]] == [str(i) for i in range(1, 13)]
    raw = {row["image_id"]: row["prob_dog"] for row in run["predictions"].to_pylist()}
    for image_id, label in run["csv"][1:]:
        assert float(label) == pytest.approx(min(max(raw[int(image_id)], 0.005), 0.995), abs=5e-7)


def test_readme_notebook_commands_run(tmp_path, monkeypatch):
    """A notebook's catdog.h5 (ImageDataGenerator(rescale=1./255), flow_from_directory, binary
    sigmoid), packaged and scored as the README shows: the CSV equals the notebook's predict."""
    from serving.metadata import read_metadata
    from serving.preprocessing import KERAS_LOAD_IMG
    from tests.model import notebook

    notebook_train = str(tmp_path / "notebook-train")
    write_labelled_folders(notebook_train, per_class=8, size=(48, 48))
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    monkeypatch.chdir(sandbox)
    write_kaggle_test_folder("data/test", 12, seed=5, side_range=(40, 96))
    model = notebook.kind1_binary_cnn(notebook_train, "catdog.h5", size=(64, 64))
    for command in readme_commands("Bring the model from your notebook"):
        run_python_command(command, stand_in_model=None)
    metadata = read_metadata("models/catdog")
    assert metadata.class_names == ["cat", "dog"] and metadata.preprocessing == KERAS_LOAD_IMG
    paths = [os.path.join("data/test", f"{i}.jpg") for i in range(1, 13)]
    expected = model.predict(notebook.load_batch(paths, (64, 64)) / 255., verbose=0)[:, 0]
    with open("out/catdog/submission.csv", newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    assert [row[0] for row in rows] == [str(i) for i in range(1, 13)]
    assert [float(label) for _, label in rows] == pytest.approx(list(expected), abs=1e-4)


def test_readme_change_model_commands_run(trained, labelled_images, tmp_path, monkeypatch):
    """The session's model as v1 and a variant of it (its dog logit shifted) as v2: the verdict
    compares the two hashes it names, and the challenger night scores every image twice."""
    from tests.pipeline.outputs import read_parquet_shards
    from tests.pipeline.test_challenger import export_variant

    monkeypatch.chdir(tmp_path)
    shutil.copytree(trained["model_dir"], "models/v1")
    export_variant(trained["model_dir"], "models/v2", labelled_images, dog_shift=1.0,
                   resize_method="bilinear", version="v2")
    write_labelled_folders("data/holdout", per_class=6, size=(48, 48), seed=11)
    write_kaggle_test_folder("data/test", 10, seed=6, side_range=(40, 72))
    for command in readme_commands("Change the model without fear"):
        run_python_command(command, stand_in_model=None)
    with open("out/v1-v2/compare.json", encoding="utf-8") as handle:
        compared = json.load(handle)
    assert compared["verdict"]["verdict"] in ("B better", "B worse", "no evidence")
    assert compared["models"]["A"]["model_sha256"] != compared["models"]["B"]["model_sha256"]
    night = read_run("out/tonight")
    assert night["summary"]["predictions"] == 10 and night["summary"]["challenger"]["model_version"] == "v2"
    challenger = read_parquet_shards("out/tonight/challenger/predictions")
    assert sorted(challenger["path"].to_pylist()) == sorted(night["predictions"]["path"].to_pylist())


RECORDER = """#!{python}
import json, os, sys
with open(os.environ["RECORDED_CALLS"], "a") as handle:
    handle.write(json.dumps({{"program": os.path.basename(sys.argv[0]), "argv": sys.argv[1:]}}) + "\\n")
if sys.argv[1:3] == ["auth", "print-access-token"]:
    print("recorded-token")
sys.exit(1 if "describe" in sys.argv else 0)  # nothing exists yet: every step creates
"""
NIGHTLY_VARIABLES = ("PROJECT", "REGION", "BUCKET", "PROFILE", "MODEL_DIR", "INPUT", "OUTPUT", "SKIP_SCORED",
                     "COMPARE_TO", "RUN_DATE", "OVERWRITE", "SCHEDULE", "TAG")


def test_readme_nightly_commands_run_against_a_recording_gcloud(tmp_path):
    """The block runs in bash as written, with ``gcloud`` and ``curl`` replaced by a recorder on
    PATH: the calls it makes are the cloud's side of the README's promises."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for program in ("gcloud", "curl"):
        (bin_dir / program).write_text(RECORDER.format(python=sys.executable))
        (bin_dir / program).chmod(0o755)
    calls = tmp_path / "calls.jsonl"
    env = {name: value for name, value in os.environ.items() if name not in NIGHTLY_VARIABLES}
    env.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", RECORDED_CALLS=str(calls))
    block = "\n".join(readme_commands("Run nightly on Dataflow"))
    process = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=120)
    assert process.returncode == 0, process.stderr[-3000:]
    recorded = [json.loads(line) for line in calls.read_text().splitlines()]
    gcloud = [call["argv"] for call in recorded if call["program"] == "gcloud"]
    tag = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.strip()

    upload = gcloud[0]
    assert upload[:3] == ["storage", "rsync", "--recursive"] and upload[3] == "models/v1"
    model_dir = upload[4]
    assert model_dir == "gs://my-petscore/models/current"
    created = [argv[3] for argv in gcloud if argv[:3] == ["iam", "service-accounts", "create"]]
    assert created == ["petscore-worker", "petscore-scheduler"]
    image = f"europe-west1-docker.pkg.dev/my-project/petscore/petscore:{tag}"
    template = f"gs://my-petscore/templates/petscore-{tag}.json"
    assert any(argv[:2] == ["builds", "submit"] and "--config" in argv for argv in gcloud)
    assert ["dataflow", "flex-template", "build", template, "--project", "my-project", "--image", image] == \
        next(argv for argv in gcloud if argv[:2] == ["dataflow", "flex-template"])[:8]

    schedule = next(argv for argv in gcloud if argv[:3] == ["scheduler", "jobs", "create"])
    assert schedule[schedule.index("--schedule") + 1] == "0 2 * * *"
    assert schedule[schedule.index("--time-zone") + 1] == "UTC"
    nightly = json.loads(schedule[schedule.index("--message-body") + 1])["launchParameter"]
    assert nightly["containerSpecGcsPath"] == template
    assert nightly["parameters"]["model_dir"] == model_dir  # the uploaded model is the scored one
    assert nightly["parameters"]["input"] == "gs://my-petscore/incoming/dt={run_date}/*.jpg"
    assert nightly["parameters"]["output"] == "gs://my-petscore/scores/dt={run_date}"
    assert (nightly["parameters"]["run_date"], nightly["parameters"]["overwrite"]) == ("yesterday", "false")
    assert nightly["parameters"]["skip_scored"] == nightly["parameters"]["compare_to"] == "gs://my-petscore/scores/dt=*"
    assert nightly["environment"]["machineType"] == "n1-standard-8"  # PROFILE=gpu

    launch = next(call["argv"] for call in recorded if call["program"] == "curl")
    assert "Authorization: Bearer recorded-token" in launch
    backfill = json.loads(launch[launch.index("-d") + 1])["launchParameter"]
    assert backfill["parameters"]["run_date"] == "2026-11-20"
    assert backfill["parameters"]["model_dir"] == model_dir


# --- commands in docs/ ---------------------------------------------------------------------------

class Parsed(Exception):
    """Raised by the patched ``ArgumentParser.parse_args`` once a command's flags parsed."""


def documented_python_commands() -> list:
    found = []
    for page in doc_pages():
        for block in code_blocks(page):
            if block.language != "bash":
                continue
            for command in commands("\n".join(block.lines)):
                tokens = shlex.split(command)
                while tokens and re.fullmatch(r"[A-Z_]+=\S*", tokens[0]):
                    tokens = tokens[1:]
                if tokens and tokens[0] in PYTHONS:
                    found.append(pytest.param(tokens, id=f"{os.path.basename(page)}:{' '.join(tokens[1:3])}"))
    return found


def test_the_docs_show_python_commands():
    assert len(documented_python_commands()) >= 20


@pytest.mark.parametrize("tokens", documented_python_commands())
def test_every_python_command_in_the_docs_parses(tokens, monkeypatch):
    """Each documented ``python -m MODULE`` and ``python bench/X.py`` command's flags go through
    the program's own parser (stopped right after parsing): a renamed flag fails here."""
    if tokens[1] == "-m":
        program, args = tokens[2], tokens[3:]
    else:
        program, args = tokens[1], tokens[2:]
        assert re.fullmatch(r"bench/\w+\.py", program), program
        assert os.path.exists(os.path.join(REPO, program)), program
    if program == "pipeline.score":
        from apache_beam.options.pipeline_options import PipelineOptions

        from pipeline.options import refuse_unknown_flags

        refuse_unknown_flags(args)
        PipelineOptions(args).get_all_options()  # argparse exits on a bad value
        return
    if not args:
        return  # nothing to parse

    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, argv=None, namespace=None):
        raise Parsed(original(self, argv, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [program, *args])
    with pytest.raises(Parsed):
        if program.endswith(".py"):
            runpy.run_path(os.path.join(REPO, program), run_name="__main__")
        else:
            importlib.import_module(program).main(args)


# --- links and tables ----------------------------------------------------------------------------

def test_every_relative_link_resolves_to_a_file_and_heading():
    problems = []
    for page in [README, *doc_pages()]:
        for line in prose(page):
            for target in LINK.findall(line):
                if re.match(r"[a-z]+:", target):  # https:, mailto:
                    continue
                path, _, anchor = target.partition("#")
                resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
                name = os.path.relpath(resolved, REPO)
                if not os.path.exists(resolved):
                    if name not in PAGES_OF_OPEN_BRANCHES or anchor:
                        problems.append(f"{os.path.relpath(page, REPO)}: {target} (no such file)")
                elif anchor and anchor not in anchors(resolved):
                    problems.append(f"{os.path.relpath(page, REPO)}: {target} (no such heading in {name})")
    assert not problems, "\n".join(problems)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {os.path.normpath(target.partition("#")[0])
              for line in prose(README) for target in LINK.findall(line)}
    pages = {os.path.relpath(page, REPO) for page in doc_pages()}
    assert pages - linked == set()
    assert set(PAGES_OF_OPEN_BRANCHES) <= linked


def test_the_scoring_page_has_a_row_for_every_flag_of_the_job_and_names_no_other():
    from pipeline.options import ScoreOptions

    parser = argparse.ArgumentParser()
    ScoreOptions._add_argparse_args(parser)
    actions = [action for action in parser._actions if action.dest != "help"]
    flags = {"--" + action.dest.replace("_", "-") for action in actions}
    spellings = {name for action in actions for name in action.option_strings if "_" not in name}
    lines = split_page(os.path.join(DOCS, "scoring.md"))[0]
    table = lines[lines.index("## Flags"):]
    table = table[:next(i for i, line in enumerate(table[1:], 1) if line.startswith("## "))]
    documented = {flag for line in table if line.startswith("| `--")
                  for flag in re.findall(r"`(--[a-z0-9-]+)", line.split("|")[1])}
    assert flags <= documented <= spellings, {"undocumented": flags - documented,
                                              "not a flag": documented - spellings}


def schema_paragraph(heading: str) -> set[str]:
    """Column names a schema paragraph of docs/scoring.md names: its snake_case code spans, less
    flags, example values (decisions, stages, --tta and --faces modes) and the per-class examples."""
    from pipeline.options import FACES_MODES
    from pipeline.rows import HUMAN
    from serving.tta import TTA_MODES

    lines = split_page(os.path.join(DOCS, "scoring.md"))[0]
    start = lines.index(heading) + 1
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("#"))
    names = set(re.findall(r"`([a-z][a-z0-9_<>]*)`", " ".join(lines[start:end])))
    return names - {"prob_cat", "prob_dog", "uncertain", "out_of_scope", HUMAN, *TTA_MODES, *FACES_MODES,
                    "read", "decode"}


def test_the_scoring_page_names_every_output_column_and_no_other():
    from pipeline.rows import ERROR_SCHEMA, prediction_schema

    predictions = {"prob_<class>" if name.startswith("prob_") else name
                   for name in prediction_schema(["cat", "dog"]).names}
    assert schema_paragraph("### Predictions schema") == predictions
    assert schema_paragraph("### Errors schema") == set(ERROR_SCHEMA.names)
