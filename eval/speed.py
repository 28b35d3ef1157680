"""Speed table: encoders side by side in one run, plus attention time against token count.

python eval/speed.py --models dfa_s,vit_h,mobilesam_vit_t,efficientvit_sam_l0 [--image-size 1024]
    [--device cpu|cuda] [--baseline vit_h] [--repeats 5] [--out speed.json]
"""

import sys
from pathlib import Path

_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
sys.path.insert(0, str(_here.parent))

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from eval.speedbench import attention_table, known_models, measure, run_child  # noqa: E402

DEFAULT_MODELS = (
    "dfa_t,dfa_s,dfa_b,vit_b,vit_l,vit_h,mobilesam_vit_t,efficientvit_sam_l0,efficientvit_sam_xl0"
)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--models",
        default=DEFAULT_MODELS,
        help=f"comma-separated, from: {', '.join(known_models())}",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=1024,
        help="input side for students and SAM (peers use their native size)",
    )
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda")
    )
    p.add_argument("--baseline", default="vit_h", help="model the ratios are taken against")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per model (median)")
    p.add_argument("--no-attention", action="store_true", help="skip the attention-scaling table")
    p.add_argument("--out", help="write every figure to this JSON file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    names = [m for m in args.models.split(",") if m]
    unknown = [m for m in names if m not in known_models()]
    if unknown:
        p.error(f"unknown models {unknown}; known: {', '.join(known_models())}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    args.names = names
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.child:
        print(
            json.dumps(measure(args.child, args.image_size, args.device, args.warmup, args.repeats))
        )
        return 0
    machine = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    print(
        f"{args.device} ({machine}), torch {torch.__version__}, batch 1, fp32, {time.strftime('%Y-%m-%d')}"
    )
    rows = []
    for name in args.names:
        rows.append(run_child(name, args.image_size, args.device, args.warmup, args.repeats))
        print(f"  measured {name}: {rows[-1]['latency_ms']:.1f} ms", flush=True)
    base = next((r for r in rows if r["model"] == args.baseline), None)
    print(
        f"\n| model | input | params (M) | GFLOPs | latency (ms) | peak memory (MB) | speed-up vs {args.baseline} |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{base['latency_ms'] / r['latency_ms']:.1f}x" if base else "n/a"
        print(
            f"| {r['model']} | {r['input']} | {r['params_m']:.2f} | {r['gflops']:.1f} | {r['latency_ms']:.1f} | {r['peak_mb']:.0f} | {ratio} |"
        )
    result = {"device": args.device, "machine": machine, "models": rows}
    if not args.no_attention:
        table = attention_table(args.device, args.repeats)
        first = table[0]
        print(
            "\n| tokens | DFA (ms) | global (ms) | windowed 14 (ms) | DFA growth | global growth |"
        )
        print("|---|---|---|---|---|---|")
        for r in table:
            print(
                f"| {r['tokens']} | {r['dfa_ms']:.2f} | {r['global_ms']:.2f} | {r['windowed_ms']:.2f} | "
                f"{r['dfa_ms'] / first['dfa_ms']:.2f}x | {r['global_ms'] / first['global_ms']:.2f}x |"
            )
        result["attention"] = table
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
