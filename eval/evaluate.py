"""One evaluation run, from a config to the printed table and the output JSON.

Every process (rank from `teachers.runtime.placement.dist_env`) selects the same images,
evaluates its share (image i -> rank i % world_size) and, with several processes, writes a part file; the
process that finds every part present merges them (with torch.distributed initialised: rank 0
after a barrier), and `--merge` does it later by hand. See eval.parts for why the merged figures
equal a single process's.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from eval.config import EvalConfig
from eval.datasets import (
    EvalDataset,
    EvalImage,
    det_images,
    gt_images,
    load_coco,
    load_lvis,
    read_detections,
    split_missing,
)
from eval.metrics import AREA_LARGE_MIN, AREA_SMALL_MAX
from eval.parts import PartWriter, missing_parts, part_path, read_parts, write_json, write_jsonl
from eval.report import det_figures, format_table, gt_figures
from eval.runner import Task, load_model, run_images
from eval.vis import Overlays
from teachers.runtime.files import check_out_file
from teachers.runtime.placement import DistEnv, dist_env, local_cuda_device, share_cpu_threads

MAX_LISTED_MISSING = 100


def load_dataset(cfg: EvalConfig) -> EvalDataset:
    if cfg.dataset == "coco":
        return load_coco(cfg.coco_root, cfg.split, cfg.coco_json)
    return load_lvis(cfg.lvis_root, cfg.coco_root, cfg.lvis_json)


def select_images(cfg: EvalConfig, ds: EvalDataset) -> tuple[list[EvalImage], list[str]]:
    """The run's images, in image-id order (identical on every rank), and the missing files."""
    if cfg.det_json:
        images = det_images(ds, read_detections(cfg.det_json, ds))
    else:
        images = gt_images(ds, cfg.task_protocol)
    if cfg.limit_images is not None:
        images = images[: cfg.limit_images]
    return split_missing(images, cfg.skip_missing)


def _stat(path: str | Path | None) -> list | None:
    if path is None:
        return None
    st = Path(path).stat()
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]


def fingerprint(cfg: EvalConfig, ds: EvalDataset) -> str:
    """Identifies what a part file was computed from: the files (path, size, mtime) and every
    setting that changes a figure. Device, progress and overlays do not count (run every rank
    on the same kind of device: CPU and GPU kernels round differently)."""
    keys = ("dataset", "split", "coco_root", "prompt", "num_clicks", "det_json", "limit_images")
    keys += ("protocol", "single_mask", "no_crowd", "skip_missing", "prompt_chunk")
    state = {k: getattr(cfg, k) for k in keys}
    state["coco_root"] = str(Path(cfg.coco_root).resolve())
    state["files"] = [_stat(p) for p in (ds.ann_json, cfg.ckpt, cfg.compare_ckpt, cfg.det_json)]
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:16]


def _header(cfg: EvalConfig, ds: EvalDataset) -> dict:
    p = cfg.task_protocol
    protocol = dict(name=p.name, prompt="detections" if cfg.det_json else cfg.prompt)
    protocol.update(num_clicks=cfg.num_clicks, include_crowd=p.include_crowd)
    protocol.update(multimask_output=p.multimask_output, min_area=p.min_area)
    protocol.update(area_small_max=AREA_SMALL_MAX, area_large_min=AREA_LARGE_MIN)
    protocol.update(mask_feedback=False, exif_orientation="ignored", det_json=cfg.det_json)
    protocol.update(ap_min_gt_area=None if cfg.ap_keep_empty_gt else 1.0)
    protocol.update(limit_images=cfg.limit_images, skip_missing=cfg.skip_missing)
    split = cfg.split if cfg.dataset == "coco" else "val"
    dataset = dict(kind=ds.kind, split=split, ann_json=str(ds.ann_json), coco_root=cfg.coco_root)
    return dict(dataset=dataset, model=cfg.ckpt, compare_model=cfg.compare_ckpt, protocol=protocol)


def evaluate_rank(
    cfg: EvalConfig, ds: EvalDataset, images: list[EvalImage], env: DistEnv, writer=None
) -> tuple[list[dict], dict]:
    """Evaluate this rank's share of `images`: (records, or none when they stream to `writer`;
    the part's footer: image ids and seconds)."""
    mine = images[env.rank :: env.world_size]
    device = local_cuda_device(env) if cfg.device == "cuda" else "cpu"
    models = [load_model(cfg.ckpt, device)]
    if cfg.compare_ckpt:
        models.append(load_model(cfg.compare_ckpt, device))
    task = Task(cfg.prompt, cfg.num_clicks, cfg.task_protocol, cfg.prompt_chunk, cfg.baseline)
    hook = Overlays(cfg.vis, cfg.vis_limit, [m.name for m in models]) if cfg.vis else None
    records, num, start = [], 0, time.perf_counter()
    progress = cfg.progress and env.rank == 0  # one bar, not one per process
    for recs in run_images(ds, mine, models, task, progress, hook):
        num += len(recs)
        if writer is None:
            records += recs
        else:  # the merge reads them back from the part file
            writer.write(recs)
    seconds = time.perf_counter() - start
    rate = num / seconds if seconds > 0 else 0.0
    print(
        f"rank {env.rank}/{env.world_size}: {num} instances on {len(mine)} images in "
        f"{seconds:.1f} s ({rate:.2f} instances/s)"
    )
    return records, {"image_ids": [im.image_id for im in mine], "seconds": seconds}


def summarize(
    cfg: EvalConfig,
    ds: EvalDataset,
    images: list[EvalImage],
    missing: list[str],
    records: list[dict],
    footers: list[dict],
) -> dict:
    """The output JSON: settings, counts, figures, timing."""
    summary = _header(cfg, ds)
    summary.update(num_images=len(images), num_images_skipped=len(missing))
    summary["missing_images"] = missing[:MAX_LISTED_MISSING]
    summary["num_annotations_skipped"] = len(ds.skipped)
    summary["skipped_annotations"] = [
        {"id": i, "reason": why} for i, why in list(ds.skipped.items())[:MAX_LISTED_MISSING]
    ]
    if cfg.det_json:
        # AP over the run's images when it is a subset, else over every GT image (a GT object
        # on an image without detections is a miss).
        subset = cfg.limit_images is not None or missing
        img_ids = [im.image_id for im in images] if subset else None
        min_area = None if cfg.ap_keep_empty_gt else 1.0
        summary.update(det_figures(records, ds.kind, ds.gt, img_ids, min_area))
    else:
        summary.update(gt_figures(records, cfg.prompt == "point"))
    seconds = max(f["seconds"] for f in footers)
    summary.update(world_size=len(footers), seconds=seconds)
    summary["instances_per_s"] = len(records) / seconds if seconds > 0 else None
    return summary


def finish(cfg: EvalConfig, summary: dict, records: list[dict]) -> dict:
    """Print the table; write OUT and OUT.instances.jsonl when --out is given."""
    print(format_table(summary))
    rate = summary["instances_per_s"]
    print(f"{summary['num_instances']} instances, {rate or 0:.2f} instances/s over all processes")
    if cfg.out:
        instances = Path(cfg.out).with_name(Path(cfg.out).name + ".instances.jsonl")
        write_jsonl(instances, records)
        write_json(cfg.out, {**summary, "instances_file": str(instances)})
        print(f"wrote {cfg.out} and {instances}")
    return summary


def _merge_world_size(out: str) -> int:
    """World size of the parts of `out`: the files' when they agree (a 1-task SLURM merge job
    must not take its own SLURM_NTASKS), else WORLD_SIZE (or SLURM's) to choose among them."""
    found = {
        p.name.rsplit("-of-", 1)[1].split(".")[0]
        for p in Path(out).parent.glob(f"{Path(out).name}.rank*-of-*.jsonl")
    }
    if len(found) == 1:
        return int(found.pop())
    if "WORLD_SIZE" in os.environ or "SLURM_NTASKS" in os.environ:
        return dist_env().world_size
    raise ValueError(
        f"cannot tell the world size from part files of {out} (found {sorted(found) or 'none'});"
        " set WORLD_SIZE"
    )


def run(cfg: EvalConfig) -> dict | None:
    """Evaluate (or merge); the summary when this process produced one, else None."""
    env = dist_env()
    if env.world_size > 1 and not cfg.out:
        raise ValueError("--out is required with several processes: part files go beside it")
    if cfg.out:
        check_out_file(cfg.out)  # before the evaluation, not after it
    share_cpu_threads()  # the node's cores split between its processes
    ds = load_dataset(cfg)
    images, missing = select_images(cfg, ds)
    found = len(images) + len(missing)
    if env.rank == 0 and cfg.limit_images is not None and cfg.limit_images > found:
        print(
            f"note: --limit-images {cfg.limit_images} is more than the {found} images "
            "with something to evaluate: evaluating all of them"
        )
    run_id = fingerprint(cfg, ds)
    if cfg.merge:
        world = _merge_world_size(cfg.out)
        records, footers = read_parts(cfg.out, world, run_id, [im.image_id for im in images])
        return finish(cfg, summarize(cfg, ds, images, missing, records, footers), records)
    if env.world_size == 1:
        records, footer = evaluate_rank(cfg, ds, images, env)
        return finish(cfg, summarize(cfg, ds, images, missing, records, [footer]), records)
    writer = PartWriter(cfg.out, env.rank, env.world_size, run_id)
    _, footer = evaluate_rank(cfg, ds, images, env, writer)
    print(f"rank {env.rank}: wrote {writer.close(footer)}")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        if env.rank != 0:
            return None
    elif missing_parts(cfg.out, env.world_size):
        waiting = missing_parts(cfg.out, env.world_size)
        print(
            f"rank {env.rank}: waiting for ranks {waiting}; the last to finish merges "
            f"(or run again with --merge), e.g. {part_path(cfg.out, waiting[0], env.world_size)}"
        )
        return None
    records, footers = read_parts(cfg.out, env.world_size, run_id, [im.image_id for im in images])
    return finish(cfg, summarize(cfg, ds, images, missing, records, footers), records)
