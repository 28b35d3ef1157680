"""The docs tables' renderers; `launch/bench/tables.py` is the command that writes them into the
docs and checks them.

* `cells`: markdown, the source line (command, machine, date, results file) and cell formats;
* `computed`: the deterministic tables, computed from the code (parameters, GFLOPs, bytes);
* `measured`: the tables rendered from a benchmark's results JSON.
"""
