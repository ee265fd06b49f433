"""Validation against a reference: observables -> metrics -> verdicts, plots -> report, page.

The entry point is ``calofm.evaluation.report.evaluate`` (``calofm evaluate`` on the command line).
Nothing is imported here, so using the observables alone does not load matplotlib or scikit-learn.
"""
