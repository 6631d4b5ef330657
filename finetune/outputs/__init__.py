"""Outputs: the run folder and its writes, evaluation bundles, submissions, scoring, figures, the report page."""
