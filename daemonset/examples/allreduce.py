"""Two-node NCCL all-reduce over the dgx-qsfp VFs; prints bus bandwidth per size like nccl-tests.

Each pod runs one rank: RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT come from the pod env
(torch.distributed env:// init). NCCL_DEBUG=INFO shows which transport NCCL chose: look for
"NET/IB : Using [0]mlx5_N:1/RoCE" (RDMA on the VF) rather than "NET/Socket".
"""

import os
import time

import torch
import torch.distributed as dist

WARMUP = 5
ITERS = 20


def main() -> None:
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if rank == 0:
        print(f"{'size':>12} {'time (us)':>12} {'algbw (GB/s)':>14} {'busbw (GB/s)':>14}", flush=True)
    for exp in range(20, 31, 2):  # 1 MiB .. 1 GiB of float32
        count = (1 << exp) // 4
        x = torch.ones(count, dtype=torch.float32, device="cuda")
        dist.all_reduce(x)
        if not torch.all(x == world):
            raise SystemExit(f"rank {rank}: wrong all-reduce result at {1 << exp} bytes")
        for _ in range(WARMUP):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(ITERS):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / ITERS
        algbw = (1 << exp) / seconds / 1e9
        busbw = algbw * 2 * (world - 1) / world  # nccl-tests' all-reduce bus bandwidth
        if rank == 0:
            print(f"{1 << exp:>12} {seconds * 1e6:>12.1f} {algbw:>14.2f} {busbw:>14.2f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
