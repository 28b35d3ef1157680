"""Evaluation only: prompts, metrics, the COCO and LVIS readers, the runners, the report, overlays
and the thin entry scripts (`coco.py`, `lvis.py`, `masks.py`); the scene generators live in
`eval.scenes`. Benchmarks live in `launch/bench/`."""
