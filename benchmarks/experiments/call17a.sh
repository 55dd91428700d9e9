#!/bin/bash
# Prepared in the sixteenth session for the next device call (~250 s cold). (1) Is the D128 backward limited by
# shared-memory wavefronts? Three bounds against main, each dQ- or dS-wrong: no dQ reductions (their 256 wavefronts
# of reads a step and their L2 traffic; +4% in the sixteenth session), half of dQ's fp32 stores (the 256 excess
# wavefronts a step of their 2-way bank conflicts: what a conflict-free layout of dQ's parts would save) and no delta
# loads (8 of the 16 LDS.64 a step: what one interleaved LSE/delta load would save). If halfsts reads near nored,
# the wavefronts are the limit and dQ's parts in register order (PLAN) are worth building; if it reads even, the
# L2 traffic is. (2) The D128 non-causal forward at 4k (fwd128_4k.sh).
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
SPEED=bwd bash benchmarks/experiments/hopper_ab.sh main hopper-bwd-nored.patch hopper-bwd-halfsts.patch \
  hopper-bwd-nodelta.patch
bash benchmarks/experiments/fwd128_4k.sh
