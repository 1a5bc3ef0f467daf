"""An RL-style weight refit over OxCCL, in Python: trainer ranks average gradients in a
communicator of class ``gradient``; after each step, trainer 0 broadcasts the new weights,
bucket by bucket, to the generator ranks through a communicator of class ``weight_refit``,
so the refit never takes NIC endpoints the gradient all-reduce needs (docs/budget.md).

    oxccl launch -n 4 -- python3 examples/weight_refit.py              # 2 trainers, 2 generators
    oxccl launch -n 4 -- python3 examples/weight_refit.py --trainers 1

Every generator checks that it holds exactly the trainers' weights after each refit.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import oxccl


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trainers", type=int, default=2, help="how many ranks train (the rest generate)")
    p.add_argument("--params", type=int, default=1 << 22, help="float32 weights in the model")
    p.add_argument("--bucket", type=int, default=1 << 20, help="weights per refit bucket")
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()

    with oxccl.Communicator.from_env() as world:
        rank = world.rank
        trainer = rank < args.trainers
        # Trainers average gradients among themselves: the gradient class.
        grads = world.split(0 if trainer else None, rank, traffic_class="gradient")
        # Trainer 0 and every generator: the weight_refit class.
        refit = world.split(0 if (rank == 0 or not trainer) else None, rank, traffic_class="weight_refit")
        weights = np.zeros(args.params, dtype=np.float32)
        for step in range(args.steps):
            t0 = time.perf_counter()
            if grads is not None:
                g = np.full(args.params, float(rank + step), dtype=np.float32)
                grads.all_reduce(g, "avg")
                weights -= 0.01 * g
            if refit is not None:
                for start in range(0, args.params, args.bucket):
                    refit.broadcast(weights[start : start + args.bucket], root=0)
                if not trainer:
                    # Each step's averaged gradient is s + (trainers - 1) / 2 everywhere.
                    want = -0.01 * sum(s + (args.trainers - 1) / 2 for s in range(step + 1))
                    assert np.allclose(weights, want, rtol=1e-5), (step, weights[0], want)
            world.barrier()
            if rank == 0:
                print(f"step {step}: {time.perf_counter() - t0:.3f} s (train + refit of {args.params * 4 >> 20} MiB)")
        if rank == 0:
            for name, c in (("gradient", grads), ("weight_refit", refit)):
                assert c is not None
                print(f"{name} communicator: class {c.traffic_class}, {c.world_size} ranks")
        for c in (grads, refit):
            if c is not None:
                c.close()


if __name__ == "__main__":
    main()
