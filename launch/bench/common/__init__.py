"""What every benchmark of the wing shares, one module a concern, all importable from here
(`from launch.bench import common`, then `common.NAME`):

* `measure`: `interleaved` times several calls in turns (round robin), so that a change of load on
  a shared machine hits all of them alike, and gives each one's median; `latency_ms` is that for
  modules in eval mode under `inference_mode`. `PeakMemory` measures the growth of the process's
  peak RSS (CPU; `/proc/self/clear_refs` resets the peak on Linux) and of
  `torch.cuda.max_memory_allocated` (CUDA) over a block. `SavedTensors` / `saved_bytes` count what
  autograd keeps for backward in an adapted model's training forward, by region (encoder, adapter
  branch, decoder). `machine_info`: platform, CPUs, torch and its threads, the GPU, the date.
* `models`: `build_encoder` builds a student, a SAM ViT or a peer encoder with random weights
  (latency does not depend on weights).
* `runs`: `run_child` calls a function of a benchmark module in a fresh interpreter (a clean
  peak-memory reading, no warm caches shared between models) and returns its JSON result;
  `run_script` runs an entry script of the repository with its output in a log file, and
  `run_entry` runs distill, adapt or eval/coco.py in this process (`train_once` a training run
  whose product is reused, resumed when it stopped part-way); `check_setup` keeps a work
  folder's stages from being reused under another setup.
* `results`: `paired` gives the mean per-instance difference of two models on the same instances,
  its standard error and the share improved, `paired_bars` draws them; `write_results` writes one
  JSON per run: the figures, the command that made them, the config, the machine and the date.
* `scoring`: students scored per instance on a COCO folder (`eval/coco.py` on a checkpoint, or
  eval's loop on a SAM in memory) and compared paired (`compare`).

Benchmarks import this package and nothing of one another.
"""

from launch.bench.common.measure import (  # noqa: F401
    DEVICES,
    PeakMemory,
    SavedTensors,
    check_device,
    default_device,
    interleaved,
    latency_ms,
    machine_info,
    saved_bytes,
    seconds,
    synchronizer,
)
from launch.bench.common.models import (  # noqa: F401
    PEERS,
    SAM_SIZES,
    build_encoder,
    check_names,
    known_models,
    random_init_,
)
from launch.bench.common.results import (  # noqa: F401
    command_line,
    paired,
    paired_bars,
    print_table,
    write_results,
)
from launch.bench.common.runs import (  # noqa: F401
    REPO,
    ChildFailed,
    check_setup,
    run_child,
    run_entry,
    run_script,
    train_once,
)
from launch.bench.common.scoring import (  # noqa: F401
    coco_records,
    compare,
    mean,
    memory_scores,
)
