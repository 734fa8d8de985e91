"""Finds extension folders and lets each one's preload.py add command-line flags (A1111 behaviour)."""
import argparse
import importlib.util
import os

from modules.paths_internal import extensions_builtin_dir, extensions_dir


def extension_dirs() -> list[str]:
    """Built-in extensions first, then user extensions; each sorted by name; dot-folders skipped."""
    found = []
    for root in (extensions_builtin_dir, extensions_dir):
        if not os.path.isdir(root):
            continue
        for name in sorted(os.listdir(root)):
            path = os.path.join(root, name)
            if os.path.isdir(path) and not name.startswith("."):
                found.append(path)
    return found


def preload_extensions(parser: argparse.ArgumentParser) -> None:
    for ext_dir in extension_dirs():
        preload_file = os.path.join(ext_dir, "preload.py")
        if not os.path.isfile(preload_file):
            continue
        try:
            spec = importlib.util.spec_from_file_location(f"preload_{os.path.basename(ext_dir)}", preload_file)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            if hasattr(module, "preload"):
                module.preload(parser)
        except Exception as e:  # a broken extension must not stop the host
            print(f"*** Error running preload() for {preload_file}: {e}")
