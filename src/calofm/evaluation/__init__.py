"""Validation against a reference: ``observables`` -> ``metrics`` -> ``plots`` -> ``report``.

The entry point is ``calofm.evaluation.report.evaluate`` (``calofm evaluate`` on the command line).
Nothing is imported here, so using the observables alone does not load matplotlib or scikit-learn.
"""
