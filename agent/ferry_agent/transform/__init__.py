"""Transforms between what a source holds and what a target loads: FP8 block
quantisation (fp8.py) and tensor-parallel resharding (reshard.py)."""
