#!/usr/bin/env python
"""Replays the turn protocol of the D128 Hopper forward (``_hopper_fwd_kernel._turn``: two consumer groups taking turns
through two named barriers; landed in the fourteenth session from ``hopper-fwd-pingpong.patch``) with the K/V stage ring, for every interleaving a scheduler may pick (random walks),
and checks that it neither deadlocks nor lets a group arrive twice at a barrier that has not completed (which
would complete it without its waiter). No GPU: the protocol only.

    python benchmarks/experiments/pingpong_protocol.py

A named barrier (``bar.sync`` / ``bar.arrive`` with 256 threads) completes once both groups' 128 threads have
reached it, the waiting group's (``sync``) and the arriving one's (``arrive``); an arrival does not wait.
"""

import random


def group_ops(g: int, n_blocks: int, empty: bool, overlap: bool = False) -> list:
    """The barrier operations of consumer group ``g`` in program order (``_consume`` / ``_step`` of
    ``_hopper_fwd_kernel``; ``overlap``: ``_first_overlap`` / ``_step_overlap`` of hopper-fwd-pingpong-overlap.patch,
    a turn issues S_j and P_{j-1} V_{j-1}; it lost, 0.82-0.89x the portable forward: ``git show
    2c67d18:benchmarks/experiments/hopper-fwd-pingpong-overlap.patch``)."""
    other = 1 - g
    ops = [("arrive", 0)] if g == 0 else []
    if overlap:
        for j in range(n_blocks):
            ops += [("wait_k", j), ("sync", g)]
            if not empty and j > 0:
                ops.append(("wait_v", j - 1))
            ops.append(("arrive", other))
            if empty:
                ops.append(("release", j))
            elif j > 0:
                ops.append(("release", j - 1))
        if not empty:
            ops.append(("wait_v", n_blocks - 1))
        ops += [("sync", g), ("arrive", other)]
        if not empty:
            ops.append(("release", n_blocks - 1))
        return ops
    ops.append(("sync", g))
    for j in range(n_blocks):
        ops.append(("wait_k", j))
        if empty:
            ops += [("arrive", other), ("sync", g)]
        else:  # S issued, turn given, softmax, V waited, turn taken, P V
            ops += [("arrive", other), ("wait_v", j), ("sync", g)]
        ops.append(("release", j))
    ops.append(("arrive", other))
    return ops


def run(n_blocks: int, stages: int, empty: tuple, rng: random.Random, overlap: bool = False) -> None:
    """One random interleaving of the two groups and the loader; raises on a deadlock or a barrier phase that
    completes without exactly one waiting group (two arrivals pairing up would release nobody, and the waiter
    would then wait for a phase nobody completes)."""
    progs = {g: group_ops(g, n_blocks, empty[g], overlap) for g in (0, 1)}
    pc = {0: 0, 1: 0}
    loaded = -1  # the last K/V block the loader has brought in
    released = [0] * n_blocks  # groups that have released each block's stage
    joined = {0: [], 1: []}  # a barrier's operations in its current phase (128 threads each)
    phase = {0: 0, 1: 0}  # completed phases of each barrier
    waiting = {}  # group -> (barrier, the phase it waits to see completed)
    for _ in range(100_000):
        if pc[0] == len(progs[0]) and pc[1] == len(progs[1]) and loaded == n_blocks - 1:
            break
        movers = []
        nxt = loaded + 1  # the loader refills a stage once both groups released its previous block
        if nxt < n_blocks and (nxt < stages or released[nxt - stages] == 2):
            movers.append("loader")
        for g in (0, 1):
            if pc[g] == len(progs[g]):
                continue
            if g in waiting:
                bar, ph = waiting[g]
                if phase[bar] > ph:
                    movers.append(g)
                continue
            op, x = progs[g][pc[g]]
            if op in ("wait_k", "wait_v") and loaded < x:
                continue
            movers.append(g)
        assert movers, f"deadlock: pc {pc}, waiting {waiting}, loaded {loaded}"
        who = rng.choice(movers)
        if who == "loader":
            loaded += 1
            continue
        g = who
        if g in waiting:  # its barrier completed: go on
            del waiting[g]
            pc[g] += 1
            continue
        op, x = progs[g][pc[g]]
        if op in ("arrive", "sync"):
            joined[x].append(op)
            ph = phase[x]
            if len(joined[x]) == 2:  # 256 threads: the phase completes
                assert sorted(joined[x]) == ["arrive", "sync"], f"barrier {x} completed by {joined[x]}"
                joined[x] = []
                phase[x] += 1
            if op == "sync":
                waiting[g] = (x, ph)
                continue
        elif op == "release":
            released[x] += 1
        pc[g] += 1
    else:
        raise AssertionError("no end")
    # left as the patch leaves them: at most one arrival (the turn group 0 would take next)
    assert all(j in ([], ["arrive"]) for j in joined.values()), joined


def main():
    rng = random.Random(0)
    for overlap in (False, True):
        cases = 0
        for n_blocks in range(1, 7):
            for stages in (2, 3):  # one stage deadlocks: a group holds the turn while it waits for the next K
                for empty in ((False, False), (False, True)):  # only the last group can start past the end
                    for _ in range(300):
                        run(n_blocks, stages, empty, rng, overlap)
                        cases += 1
        print(f"{'overlap' if overlap else 'plain'}: {cases} random interleavings, no deadlock, every barrier phase"
              " completed by one waiting and one arriving group")


if __name__ == "__main__":
    main()
