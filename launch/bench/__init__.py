"""The benchmark wing: every benchmark of the project, one script each, run as
`python launch/bench/NAME.py` (each writes one results JSON: figures, command, machine, date).

* `speed.py`: encoders side by side (latency, parameters, GFLOPs, peak memory) and attention
  against token count (`python eval/speed.py` forwards here);
* `cache_codecs.py`: the teacher-cache codecs at real SAM shapes (bytes, throughput, error);
* `distill_throughput.py`: distillation from the cache against an online teacher;
* `claims.py`: SAM-Lightening's and EdgeSAM's claims (distillation, DLD, attention, phase 2,
  int8 and pruning) measured against the reference teacher, paired per held-out instance;
* `phase2_cost.py`: a phase-2 step against a phase-1 step;
* `eval_runner.py`: the evaluation runner against a plain `SamPredictor` loop;
* `adapt.py`: training memory and speed of every adapter method; `meta.py`: META's MEA block
  against a ViT block;
* `deploy.py`: ONNX fp32/int8, PyTorch int8 and pruned students against the fp32 student.

They share one helper package, `common/` (measuring, the encoders, runs, paired comparisons and the
results JSON), take their flags from a config dataclass (`teachers.runtime.flags`), and import
nothing of one another.
"""
