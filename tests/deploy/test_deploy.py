"""What can be checked of deploy/ without a Google Cloud project."""

import json
import os
import re
import subprocess
import sys

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions

from model.metadata import read_metadata
from pipeline.options import ScoreOptions
from pipeline.score import build_pipeline, resolve_date_placeholders

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPLOY = os.path.join(REPO, "deploy")
IMAGE = "europe-west1-docker.pkg.dev/my-project/petscore/petscore:abc123"
GPU = "worker_accelerator=type:nvidia-tesla-t4;count:1;install-nvidia-driver"


def flex_parameters() -> list[dict]:
    with open(os.path.join(DEPLOY, "flex-template", "metadata.json")) as handle:
        return json.load(handle)["parameters"]


def score_option_names() -> set[str]:
    return {action.dest for action in _score_parser()._actions}


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
    ("max_batch_size", "128", "0"),
])
def test_flex_template_regexes_accept_good_values_and_reject_bad(name, good, bad):
    regexes = next(p["regexes"] for p in flex_parameters() if p["name"] == name)
    assert all(re.fullmatch(r, good) for r in regexes)
    assert not all(re.fullmatch(r, bad) for r in regexes)


def test_values_as_the_flex_template_passes_them_parse_into_options():
    """Flex Templates pass every parameter as --name=value, booleans included."""
    argv = ["--input=gs://b/in/dt={run_date}/*.jpg", "--model_dir=gs://b/m", "--output=gs://b/o/dt={run_date}",
            "--run_date=2026-11-21", "--overwrite=true", "--share_model_across_processes=false",
            "--min_confidence=0.75", "--max_batch_size=128"]
    options = PipelineOptions(argv).view_as(ScoreOptions)
    resolve_date_placeholders(options)
    assert options.overwrite is True and options.share_model_across_processes is False
    assert options.output == "gs://b/o/dt=2026-11-21" and options.input == "gs://b/in/dt=2026-11-21/*.jpg"
    assert (options.min_confidence, options.max_batch_size) == (0.75, 128)


def test_scheduler_launch_body_uses_only_template_parameters():
    env = {**os.environ, "PROJECT": "my-project", "BUCKET": "gs://my-bucket", "TAG": "abc123"}
    for profile, machine in (("gpu", "n1-standard-8"), ("cpu", "n2-standard-4")):
        body = subprocess.run(["bash", os.path.join(DEPLOY, "nightly.sh"), "launch-body"],
                              env={**env, "PROFILE": profile}, capture_output=True, text=True, check=True)
        launch = json.loads(body.stdout)["launchParameter"]
        assert set(launch["parameters"]) <= {p["name"] for p in flex_parameters()}
        assert launch["parameters"]["output"] == "gs://my-bucket/scores/dt={run_date}"
        assert launch["parameters"]["skip_scored"] == "gs://my-bucket/scores/dt=*/predictions/*.parquet"
        assert launch["environment"]["machineType"] == machine
        assert launch["environment"]["sdkContainerImage"] == IMAGE
        assert (GPU in launch["environment"]["additionalExperiments"]) == (profile == "gpu")
        assert launch["parameters"]["share_model_across_processes"] == str(profile == "gpu").lower()


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


def test_shell_scripts_pass_shellcheck():
    shellcheck = os.path.join(os.path.dirname(sys.executable), "shellcheck")
    scripts = [os.path.join(DEPLOY, "nightly.sh"), os.path.join(REPO, ".ci", "run"),
               *[os.path.join(REPO, "scripts", n) for n in sorted(os.listdir(os.path.join(REPO, "scripts")))
                 if n.endswith(".sh")]]
    result = subprocess.run([shellcheck, *scripts], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_production_flags_build_a_dataflow_job_offline(trained):
    """DataflowRunner with --dry_run builds the job (pipeline proto + job request), sends nothing."""
    argv = ["--runner=DataflowRunner", "--project=my-project", "--region=europe-west1",
            "--temp_location=gs://my-bucket/tmp", "--staging_location=gs://my-bucket/staging",
            "--job_name=petscore-nightly", "--no_auth", "--dry_run=True", "--sdk_location=container",
            f"--sdk_container_image={IMAGE}", f"--dataflow_service_options={GPU}",
            "--machine_type=n1-standard-8", "--experiments=use_runner_v2",
            "--input=gs://my-bucket/incoming/dt={run_date}/*.jpg", "--model_dir=gs://my-bucket/models/v1",
            "--output=gs://my-bucket/scores/dt={run_date}", "--run_date=2026-11-21",
            "--share_model_across_processes=true"]
    options = PipelineOptions(argv)
    score_options = options.view_as(ScoreOptions)
    resolve_date_placeholders(score_options)
    pipeline = beam.Pipeline(options=options)
    build_pipeline(pipeline, score_options, read_metadata(trained["model_dir"]), "run", 0.0)
    job = pipeline.run().job
    names = {t.unique_name for t in job.proto_pipeline.components.transforms.values()}
    assert {"ReadImagePaths", "DecodeImages", "ScoreImages", "WriteKaggleCsv", "WritePredictions",
            "WriteErrors", "WriteRunSummary"} <= names
    assert any("RunInference" in name for name in names)
    payloads = [env.payload for env in job.proto_pipeline.components.environments.values()]
    assert any(IMAGE.encode() in payload for payload in payloads)
    assert job.options.view_as(GoogleCloudOptions).dataflow_service_options == [GPU]
    assert job.proto.name == "petscore-nightly"
