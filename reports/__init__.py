"""Self-contained HTML pages shared by the run report (``pipeline.report``) and the evaluation
report (``model.evaluate``)."""
