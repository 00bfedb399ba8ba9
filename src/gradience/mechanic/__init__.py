"""The mechanic: commands over saved adapters (audit, compress, compare, merge, explain, bench).

The public functions are also reachable from the top-level package, e.g. `gradience.audit`.
"""
