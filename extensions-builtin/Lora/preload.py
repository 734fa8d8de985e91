"""Command-line flags of the Lora extension (A1111 names and defaults)."""
import argparse
import os

from modules import paths_internal


def preload(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lora-dir", type=str, help="Path to directory with Lora networks.",
                        default=os.path.join(paths_internal.models_path, "Lora"))
    parser.add_argument("--lyco-dir-backcompat", type=str,
                        help="Path to directory with LyCORIS networks (for backwards compatibility; can also use "
                             "--lyco-dir).",
                        default=os.path.join(paths_internal.models_path, "LyCORIS"))
