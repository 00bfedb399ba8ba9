"""Readers of a run log (run.jsonl) for people: monitor, plot and the HTML report.

The public functions are also reachable from the top-level package, e.g. `gradience.monitor`.
"""
