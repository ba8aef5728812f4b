"""The thread budget: decoders and LiteRT sized together, per worker process, from its cores."""

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.options import ScoreOptions, ThreadBudget, thread_budget


@pytest.mark.parametrize("argv, processes", [
    ([], 1),
    (["--direct_running_mode=multi_processing", "--direct_num_workers=4"], 4),
    (["--direct_running_mode=multi_threading", "--direct_num_workers=4"], 4),  # a pool per thread
    (["--runner=DataflowRunner"], None),  # one SDK process per vCPU
    (["--runner=DataflowRunner", "--experiments=no_use_multiple_sdk_containers"], 1),
])
def test_the_budget_knows_how_many_processes_share_a_machine(argv, processes):
    options = PipelineOptions(argv)
    assert thread_budget(options, options.view_as(ScoreOptions)).processes == processes


@pytest.mark.parametrize("budget, cores, remote, want", [
    (ThreadBudget(), 16, False, (16, 16)),  # one process: every core, for both
    (ThreadBudget(processes=4), 16, False, (4, 4)),  # four processes: a quarter each
    (ThreadBudget(processes=None), 8, False, (2, 1)),  # a process per core: at least 2 decoders
    (ThreadBudget(processes=None), 8, True, (8, 1)),  # object store: reads wait on the network
    (ThreadBudget(decode_threads=3, tflite_threads=5, processes=4), 16, False, (3, 5)),  # asked for
    (ThreadBudget(processes=64), 16, False, (2, 1)),  # more processes than cores
])
def test_each_process_gets_its_share_of_the_cores(budget, cores, remote, want):
    assert budget.resolve(cores, remote=remote) == want
