"""The claims benchmark's parts; `launch/bench/claims.py` is its command and says what it measures.

* `stages`: the scenes, the teacher's cache, distillation runs and their held-out scores, each done
  once under --work;
* `arms`: one function per question (distill, dld, attention, phase2, deploy, adapters);
* `report`: the docs' tables, the README's headline, the plot and the printout.
"""
