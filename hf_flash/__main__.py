"""``python -m hf_flash``: print which attention path hf_flash takes on this machine, and why."""

from hf_flash.info import info

if __name__ == "__main__":
    info()
