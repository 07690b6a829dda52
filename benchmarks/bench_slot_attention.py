"""Decode-attention speed: kvc's slot attention on a compressed cache against dense SDPA on the full cache.

For each context length and kept fraction, the kept slots are spread unevenly over the KV heads (as a
compiled plan does) and every slot is filled; with --kv-bits the rows are low-bit codes read in place.
On CUDA kvc runs its Triton kernels, timed with CUDA events; on CPU it runs the PyTorch reference,
timed with time.perf_counter. Medians of --repeats runs.
"""

import argparse
import functools
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F
import triton

from kvc.plan import row_bytes
from kvc.runtime.kernels import slot_attention, use_triton
from kvc.runtime.quantize import encode_turned

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args():
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: 8 on CUDA, 1 on CPU")
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=None, help="default: 128 on CUDA, 64 on CPU")
    parser.add_argument("--contexts", default=None, help="comma list; default 4096,16384,65536 on CUDA, 1024,4096 on CPU")
    parser.add_argument("--fractions", default="1,0.5,0.25,0.1")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per point; default 50 on CUDA, 20 on CPU")
    parser.add_argument("--return-probs", action="store_true", help="also compute the per-slot probabilities")
    parser.add_argument("--kv-bits", type=int, default=0, choices=[0, 2, 4, 8], help="low-bit rows (0: --dtype)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    on_cuda = torch.device(args.device).type == "cuda"
    args.batch = args.batch or (8 if on_cuda else 1)
    args.head_dim = args.head_dim or (128 if on_cuda else 64)
    args.contexts = args.contexts or ("4096,16384,65536" if on_cuda else "1024,4096")
    args.dtype = args.dtype or ("bfloat16" if on_cuda else "float32")
    args.repeats = args.repeats or (50 if on_cuda else 20)
    if args.q_heads % args.kv_heads != 0:
        parser.error(f"--q-heads {args.q_heads} is not a multiple of --kv-heads {args.kv_heads}")
    return args


def uneven_capacities(context, kv_heads, fraction):
    """Capacities summing to about fraction * context * kv_heads, proportional to weights rising
    from 1 to 3 over the heads and capped at context, the overflow of capped heads going to the others."""
    weights = torch.linspace(1.0, 3.0, kv_heads)
    capacities = torch.zeros(kv_heads)
    budget = fraction * context * kv_heads
    open_heads = torch.ones(kv_heads, dtype=torch.bool)
    while open_heads.any() and budget - capacities.sum() > 0.5:
        share = (budget - capacities.sum()) * weights * open_heads / (weights * open_heads).sum()
        capacities = torch.minimum(capacities + share, torch.tensor(float(context)))
        open_heads = capacities < context
    return capacities.round().to(torch.int64)


def median_seconds(function, repeats, device):
    """Median wall time of one call, after warm-up (which also compiles the Triton kernels)."""
    for _ in range(3):
        function()
    samples = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            function()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeats):
            start = time.perf_counter()
            function()
            samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main():
    args = parse_args()
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    generator = torch.Generator(device=device).manual_seed(0)
    contexts = [int(context) for context in args.contexts.split(",")]
    fractions = [float(fraction) for fraction in args.fractions.split(",")]
    bytes_per_slot = 2 * row_bytes(args.head_dim, args.dtype, args.kv_bits)  # K and V

    results = []
    header = f"{'context':>8} {'fraction':>8} {'kept MiB':>9} {'kvc ms':>9} {'kvc GB/s':>9} {'sdpa ms':>9} {'sdpa GB/s':>9} {'speedup':>8}"
    path = "triton" if use_triton(torch.empty(0, device=device)) else "reference"
    print(f"device: {device_name(device)}; kvc path: {path}; batch {args.batch}, heads {args.q_heads}/{args.kv_heads}, "
          f"head_dim {args.head_dim}, {args.dtype}, kv_bits={args.kv_bits}, return_probs={args.return_probs}")
    print(header)
    for context in contexts:
        query = torch.randn(args.batch, args.q_heads, 1, args.head_dim, generator=generator, device=device, dtype=dtype)
        full_keys = torch.randn(args.batch, args.kv_heads, context, args.head_dim, generator=generator, device=device, dtype=dtype)
        full_values = torch.randn_like(full_keys)
        sdpa = functools.partial(F.scaled_dot_product_attention, query, full_keys, full_values, enable_gqa=True)
        sdpa_seconds = median_seconds(sdpa, args.repeats, device)
        full_bytes = args.batch * args.kv_heads * context * bytes_per_slot
        del sdpa, full_keys, full_values
        for fraction in fractions:
            capacities = uneven_capacities(context, args.kv_heads, fraction).tolist()
            segments = [(sum(capacities[:head]), capacity) for head, capacity in enumerate(capacities)]
            total_slots = sum(capacities)
            rows = [torch.randn(args.batch, total_slots, args.head_dim, generator=generator, device=device, dtype=dtype)
                    for _ in range(2)]
            keys, values = (encode_turned(x, args.kv_bits) for x in rows) if args.kv_bits else rows
            positions = torch.arange(total_slots, device=device, dtype=torch.int32).expand(args.batch, -1).contiguous()
            table = torch.tensor(segments, device=device).reshape(-1, 2)
            kvc = functools.partial(slot_attention, query, keys, values, positions, segments, args.head_dim ** -0.5,
                                    args.kv_bits, None, args.return_probs, table)
            kvc_seconds = median_seconds(kvc, args.repeats, device)
            kept_bytes = args.batch * total_slots * bytes_per_slot
            row = {
                "context": context, "fraction": fraction, "capacities": capacities,
                "kept_bytes": kept_bytes, "full_bytes": full_bytes,
                "kvc_seconds": kvc_seconds, "kvc_gb_per_s": kept_bytes / kvc_seconds / 1e9,
                "sdpa_seconds": sdpa_seconds, "sdpa_gb_per_s": full_bytes / sdpa_seconds / 1e9,
                "speedup": sdpa_seconds / kvc_seconds,
            }
            results.append(row)
            print(f"{context:>8} {fraction:>8.2f} {kept_bytes / 2**20:>9.1f} {kvc_seconds * 1e3:>9.3f} "
                  f"{row['kvc_gb_per_s']:>9.1f} {sdpa_seconds * 1e3:>9.3f} {row['sdpa_gb_per_s']:>9.1f} "
                  f"{row['speedup']:>7.2f}x")
            del kvc, keys, values, rows

    if args.json:
        report = {
            "device": device_name(device),
            "kvc_path": path,
            "torch": torch.__version__,
            "triton": triton.__version__,
            "settings": vars(args),
            "results": results,
        }
        with open(args.json, "w") as file:
            json.dump(report, file, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
