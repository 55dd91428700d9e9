"""``python -m hf_flash``: print which attention path hf_flash takes on this machine, and why."""

import argparse

from hf_flash.info import info


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m hf_flash",
        description="Print which attention path hf_flash takes on this machine, and why: the versions that "
        "matter (torch, Triton, Transformers), whether Triton's interpreter is on, each GPU's chip and tile "
        "table, and per dtype whether attention runs on the hf_flash kernels or falls back to PyTorch SDPA, "
        'including the path attn_implementation="hf_flash" takes.',
        epilog="The same from Python: hf_flash.info() prints it, hf_flash.info.report() returns it as a dict.",
    )
    parser.parse_args(argv)
    info()


if __name__ == "__main__":
    main()
